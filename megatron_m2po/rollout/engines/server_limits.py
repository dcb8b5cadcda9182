"""The CPU engine server's limits: how long a client may take, how much it may send, how many may connect.

The defaults serve a trainer's farm on one host or a cluster network with room to spare and keep a
hostile or broken client from holding the server: a request head must arrive within 10 s, a body within
60 s, a /generate body is at most 8 MiB (a 128k-token prompt is under 1 MiB of JSON), and the open
connections stay below the process's file limit. Each limit is a flag of
`python -m megatron_m2po.rollout.engines.local_server` (`m2po engines --server-args "..."`).
"""

from __future__ import annotations

import argparse
import math
import resource
from dataclasses import dataclass, fields

FD_RESERVE = 128  # descriptors kept for model files, threads, logs and the update group's sockets
DEFAULT_MAX_CONNECTIONS = 1024

# field -> (flag, help); the flags' values are in the fields' units except --max-body-mb
FLAGS = {
    "header_timeout_s": ("--header-timeout", "seconds a client may take to send a request head (then 408)"),
    "body_timeout_s": ("--body-timeout", "seconds a client may take to send a request body (then 408)"),
    "idle_timeout_s": ("--idle-timeout", "seconds an idle kept-alive connection stays open"),
    "max_connections": (
        "--max-connections",
        f"open connections at most (default: {DEFAULT_MAX_CONNECTIONS}, or the file limit less {FD_RESERVE})",
    ),
    "max_body_bytes": ("--max-body-mb", "largest request body in MiB (then 413)"),
    "rendezvous_timeout_s": (
        "--rendezvous-timeout",
        "seconds /init_weights_update_group waits for the other ranks",
    ),
}


def file_limit() -> int:
    """The process's soft limit on open files (RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 75.0
    max_connections: int = 0  # 0: the default, min(1024, file limit - FD_RESERVE)
    max_body_bytes: int = 8 << 20
    rendezvous_timeout_s: float = 60.0

    def __post_init__(self):
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "rendezvous_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{FLAGS[name][0]} must be a positive number of seconds, got {value!r}")
        if (
            isinstance(self.max_body_bytes, bool)
            or not isinstance(self.max_body_bytes, int)
            or self.max_body_bytes < 1
        ):
            raise ValueError(f"--max-body-mb must be positive, got {self.max_body_bytes!r} bytes")
        cap, room = self.max_connections, file_limit() - FD_RESERVE
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"--max-connections must be a positive integer (0: the default), got {cap!r}")
        if cap > room:
            raise ValueError(
                f"--max-connections {cap} leaves too few of the process's {file_limit()} open files "
                f"(ulimit -n) for the rest of the server: at most {room}"
            )

    @property
    def connection_cap(self) -> int:
        return self.max_connections or max(1, min(DEFAULT_MAX_CONNECTIONS, file_limit() - FD_RESERVE))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerLimits()
    for f in fields(ServerLimits):
        flag, help_text = FLAGS[f.name]
        if f.name == "max_body_bytes":
            parser.add_argument(flag, type=float, default=defaults.max_body_bytes / (1 << 20), help=help_text)
        else:
            parser.add_argument(
                flag,
                type=int if f.type == "int" else float,
                default=getattr(defaults, f.name),
                help=help_text,
            )


def from_args(args: argparse.Namespace) -> ServerLimits:
    """The limits the flags of `add_arguments` name; a bad value raises ValueError naming its flag."""
    values = {
        f.name: getattr(args, FLAGS[f.name][0].lstrip("-").replace("-", "_")) for f in fields(ServerLimits)
    }
    mb = values["max_body_bytes"]
    if not math.isfinite(mb) or mb <= 0:
        raise ValueError(f"--max-body-mb must be a positive number, got {mb!r}")
    values["max_body_bytes"] = max(1, int(mb * (1 << 20)))
    return ServerLimits(**values)
