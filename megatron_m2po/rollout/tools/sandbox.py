"""A sandboxed Python tool: run model-written code in a fresh, isolated, resource-limited process.

Why a fresh process per call, in new Linux namespaces: the code is hostile until proven otherwise (an
infinite loop, a fork bomb, `os.environ["M2PO_API_KEY"]`, a socket to the trainer's engines). Each call gets
its own user, mount, network, pid, ipc and uts namespaces (see `sandbox_init.py`): no network interface at
all, a read-only view of the filesystem with a private tmpfs as /tmp and working directory, its own pid 1
(everything it started dies with the call), an unprivileged uid, rlimits on CPU, memory, processes and file
size, and an environment built from an allowlist. The caller bounds wall time and output.

Every failure is a `ToolResult` (with `error` or `limit` set), never an exception into the rollout.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_m2po.config import SandboxConfig

logger = logging.getLogger(__name__)

INIT = Path(__file__).with_name("sandbox_init.py")
TRUNCATED = "\n[... output truncated: more than {limit} bytes]\n"
# What the code's environment holds: nothing of the caller's (no keys, tokens, tracker settings, proxies).
CODE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}
Limit = Literal["wall", "cpu", "memory", "output"]
LIMIT_WORDS = {
    "wall": "time limit exceeded",
    "cpu": "CPU time limit exceeded",
    "memory": "memory limit exceeded",
    "output": "output limit exceeded",
}


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate tool code as required; the message names what is missing."""


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome. `limit` names the limit that ended it; `error` is the sandbox's own failure (the
    code never ran or its result was lost); a nonzero `exit_code` or a `signal` is the code's own."""

    stdout: str
    stderr: str
    exit_code: int | None = None
    signal: int | None = None
    limit: Limit | None = None
    error: str | None = None
    truncated: bool = False
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    setup_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None and self.error is None

    def as_text(self) -> str:
        """What a model reads back: stdout, then stderr, then one line for how the call ended unless it
        ended normally."""
        parts = [self.stdout, self.stderr]
        if self.error:
            parts.append(f"[the tool failed: {self.error}]\n")
        elif self.limit:
            parts.append(f"[stopped: {LIMIT_WORDS[self.limit]}]\n")
        elif self.signal is not None:
            parts.append(f"[killed by signal {self.signal}]\n")
        elif self.exit_code:
            parts.append(f"[exit status {self.exit_code}]\n")
        return "".join(p if not p or p.endswith("\n") else p + "\n" for p in parts)


@dataclass(frozen=True)
class Capabilities:
    """What isolation this machine gave a probe call: per namespace, the private /proc, and problems."""

    isolated: bool
    namespaces: dict[str, bool] = field(default_factory=dict)
    proc: bool = False
    as_root: bool = False
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.isolated:
            return "UNISOLATED (resource limits only): " + "; ".join(self.problems)
        spaces = ", ".join(n for n, ok in self.namespaces.items() if ok)
        uid = "root mapped to an unprivileged uid" if self.as_root else "the caller's uid"
        return f"isolated: namespaces {spaces}; private /proc {self.proc}; code runs as {uid}"


def _expose_paths() -> list[str]:
    """The interpreter's installation, which the code must still reach inside the namespace."""
    paths = {
        os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parents[1])
    }
    return sorted(p for p in paths if not any(p != q and p.startswith(q + os.sep) for q in paths))


class _BoundedReader:
    """Keeps the first `limit` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.kept, self.seen = limit, bytearray(), 0

    def feed(self, data: bytes) -> None:
        self.seen += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def over(self) -> bool:
        return self.seen > self.limit

    def text(self) -> str:
        out = self.kept.decode("utf-8", errors="replace")
        return out + TRUNCATED.format(limit=self.limit) if self.over else out


class Sandbox:
    """Runs code with the limits of `config`; `probe()` (done on construction) checks the isolation works.

    Raises SandboxUnavailable on construction where isolation is impossible, unless
    `config.allow_unisolated`, in which case calls run with the resource limits only (said in the log)."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.isolate = True
        self.capabilities = self.probe()
        if not self.capabilities.isolated:
            if not self.config.allow_unisolated:
                raise SandboxUnavailable(
                    "the Python tool sandbox cannot isolate code on this machine: "
                    + "; ".join(self.capabilities.problems)
                    + ". Set sandbox.allow_unisolated=true to run tool code with resource limits only "
                    "(no network, filesystem or process isolation)"
                )
            self.isolate = False
            logger.warning("Python tool sandbox: %s", self.capabilities.describe())
        else:
            logger.info("Python tool sandbox: %s", self.capabilities.describe())

    def probe(self) -> Capabilities:
        """One isolated call that checks, from inside, what it got."""
        if not sys.platform.startswith("linux"):
            return Capabilities(False, problems=(f"Linux namespaces are not available on {sys.platform}",))
        check = (
            "import socket, os\n"
            "s = socket.socket()\n"
            "s.settimeout(1)\n"
            "try:\n"
            "    s.connect(('127.0.0.1', 9)); print('network')\n"
            "except OSError:\n"
            "    pass\n"
            "print('pid', os.getpid())\n"
        )
        result, report = self._run(check, timeout=30.0, isolate=True)
        as_root = os.geteuid() == 0
        if result.error:
            return Capabilities(False, as_root=as_root, problems=(result.error,))
        problems = []
        if "network" in result.stdout:
            problems.append("network: the code reached 127.0.0.1 (network namespace not in effect)")
        if "pid 1\n" in result.stdout or "pid 2\n" not in result.stdout:
            problems.append(f"pid namespace: the code is not pid 2 of its own namespace ({result.stdout!r})")
        if not result.ok:
            problems.append(
                f"the probe call failed: exit {result.exit_code}, signal {result.signal}: {result.stderr[-500:]}"
            )
        isolation = report.get("isolation", {})
        return Capabilities(
            not problems,
            namespaces={k: bool(v) for k, v in isolation.items() if k != "proc"},
            proc=bool(isolation.get("proc")),
            as_root=as_root,
            problems=tuple(problems + report.get("warnings", [])),
        )

    def run(self, code: str, timeout: float | None = None) -> ToolResult:
        """Run `code` (Python source) and return what it printed and how it ended; never raises."""
        try:
            return self._run(code, timeout, self.isolate)[0]
        except Exception as e:  # a sandbox bug must not become an exception in the rollout
            logger.exception("Python tool sandbox failed")
            return ToolResult("", "", error=f"sandbox failure: {type(e).__name__}: {e}")

    def _spec(self, isolate: bool, workdir: str | None, status_fd: int) -> dict:
        c = self.config
        return {
            "isolate": isolate,
            "python": sys.executable,
            "status_fd": status_fd,
            "cpu_seconds": c.cpu_seconds,
            "memory_bytes": c.memory_mb << 20,
            "max_processes": c.max_processes,
            "max_file_bytes": c.disk_mb << 20,
            "disk_bytes": c.disk_mb << 20,
            "outside_uid": c.outside_uid,
            "outside_gid": c.outside_uid,
            "expose": _expose_paths(),
            "workdir": workdir,
            "env": dict(CODE_ENV, HOME=workdir or "/tmp", TMPDIR=workdir or "/tmp"),
        }

    def _run(self, code: str, timeout: float | None, isolate: bool) -> tuple[ToolResult, dict]:
        wall = float(timeout if timeout is not None else self.config.wall_seconds)
        limit = self.config.max_output_bytes
        workdir = None if isolate else tempfile.mkdtemp(prefix="m2po-tool-")
        start = time.monotonic()
        status_r, status_w = os.pipe()
        try:
            spec = self._spec(isolate, workdir, status_w)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(INIT), json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group, killed as one
                env=dict(CODE_ENV),
            )
        finally:
            os.close(status_w)
        out, err, status = _BoundedReader(limit), _BoundedReader(limit), _BoundedReader(1 << 16)
        hit: Limit | None = None
        try:
            try:
                proc.stdin.write(code.encode("utf-8", errors="surrogateescape"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            status_file = os.fdopen(status_r, "rb", buffering=0)
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ, out)
                sel.register(proc.stderr, selectors.EVENT_READ, err)
                sel.register(status_file, selectors.EVENT_READ, status)
                deadline = start + wall
                while sel.get_map():
                    left = deadline - time.monotonic()
                    if left <= 0 and hit is None:
                        hit = "wall"
                        _kill(proc)
                        deadline = time.monotonic() + 5.0  # to drain what is left after the kill
                        continue
                    if left <= 0:
                        break
                    for key, _ in sel.select(timeout=left):
                        data = os.read(key.fileobj.fileno(), 1 << 16)
                        if not data:
                            sel.unregister(key.fileobj)
                            continue
                        key.data.feed(data)
                        if (out.over or err.over) and hit is None:
                            hit = "output"
                            _kill(proc)
            status_file.close()
        finally:
            _kill(proc)
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        lines = bytes(status.kept).decode(errors="replace").strip().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        cpu = float(report.get("cpu_seconds", 0.0))
        sig = report.get("signal")
        if hit is None:
            # RLIMIT_CPU sends SIGXCPU at the limit (rusage may read a tick under it), SIGKILL a second later.
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= self.config.cpu_seconds):
                hit = "cpu"
            elif "MemoryError" in err.text()[-2000:]:  # RLIMIT_AS: an allocation failed
                hit = "memory"
        error = report.get("error")
        if not report and hit is None:
            error = (
                f"the sandbox ended without a status (launcher exit {proc.returncode}): {err.text()[-500:]}"
            )
        result = ToolResult(
            stdout=out.text(),
            stderr=err.text(),
            exit_code=report.get("exit_code"),
            signal=sig,
            limit=hit,
            error=error,
            truncated=out.over or err.over,
            wall_seconds=time.monotonic() - start,
            cpu_seconds=cpu,
            setup_seconds=float(report.get("setup_seconds", 0.0)),
        )
        return result, report


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; the namespace's pid 1 dies with it (PDEATHSIG) and the kernel
    kills everything else in the namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
