"""Start a node's engine servers (and sglang-router in front), wait until healthy, stop them.

The command is `m2po engines` (`commands/engines.py`):

    m2po engines --model HF_DIR --servers 8 --tp 1 --router
    m2po engines --model HF_DIR --servers 2 --backend local          # the same, CPU engines

`backend="sglang"` runs `python -m sglang.launch_server` per server (GPUs split by CUDA_VISIBLE_DEVICES,
`tp` each); `backend="local"` runs megatron_m2po's LocalEngine behind the same HTTP API (one process
and core each), so a CPU farm exercises the same client, retries and kill handling. Logs go to
`log_dir/<name>.log`; a server that exits or stays unhealthy past `timeout` is an error naming its log.

Keys: every server gets `--api-key` (and `--admin-api-key` when set; sglang's control routes then take only
that key), the router gets `--api-key` for its calls to the workers, and `engines()` / `router_engine()` hand
the keys to their clients. On the command line the keys come from environment variables (`--api-key-env`,
default M2PO_API_KEY), so they stay out of configs and shell history; a host other than loopback without a
key is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_m2po.net import free_port, is_healthy
from megatron_m2po.rollout.engines.local_server import check_bind
from megatron_m2po.rollout.engines.sglang import SGLangEngine

logger = logging.getLogger(__name__)

ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"


def _local_moe(model_path: str | Path) -> bool:
    """Whether `model_path` is a local model dir whose config.json has routed experts; a Hub
    name or a dir without config.json reads as dense (give routed_experts=True for those)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return False
    raw = json.loads(config.read_text())
    experts = raw.get("num_experts", raw.get("num_local_experts"))  # transformers 5 writes the latter
    return isinstance(experts, int) and experts > 0


KEY_FLAGS = ("--api-key", "--admin-api-key")


def _redacted(cmd: list[str]) -> list[str]:
    """The command line as logged: key values replaced (the keys are never written to a log)."""
    return ["***" if i and cmd[i - 1] in KEY_FLAGS else a for i, a in enumerate(cmd)]


class EngineLauncher:
    """The servers of one node. Use as a context manager, or call start() / stop()."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        servers: int = 1,
        tp: int = 1,
        backend: str = "sglang",
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        router: bool = False,
        router_port: int | None = None,
        gpu_ids: Sequence[int | str] | None = None,
        request_timeout: float = 3600.0,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        routed_experts: bool | None = None,
    ):
        """`routed_experts`: servers record and return the experts each token is routed to (routing replay,
        `--enable-return-routed-experts`); None = when `model_path` is a local MoE model dir."""
        if backend not in ("sglang", "local"):
            raise ValueError(f"EngineLauncher: backend must be 'sglang' or 'local', got {backend!r}")
        if servers < 1:
            raise ValueError(f"EngineLauncher: servers must be >= 1, got {servers}")
        check_bind(host, api_key)
        self.api_key, self.admin_api_key = api_key or None, admin_api_key or None
        self.model_path, self.servers, self.tp, self.backend, self.host = (
            str(model_path),
            servers,
            tp,
            backend,
            host,
        )
        self.ports = list(ports) if ports else [free_port(host) for _ in range(servers)]
        if len(self.ports) != servers:
            raise ValueError(f"EngineLauncher: {servers} servers but {len(self.ports)} ports")
        self.router, self.router_port = router, router_port or (free_port(host) if router else None)
        self.env = dict(env or {})
        self.gpu_ids = [str(g) for g in gpu_ids] if gpu_ids is not None else self._visible_gpus(servers * tp)
        self.request_timeout = request_timeout
        if backend == "sglang" and len(self.gpu_ids) < servers * tp:
            raise ValueError(
                f"EngineLauncher: {servers} servers x tp {tp} need {servers * tp} GPUs, "
                f"got gpu_ids {self.gpu_ids}"
            )
        self.routed_experts = _local_moe(model_path) if routed_experts is None else routed_experts
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[str, subprocess.Popen] = {}

    def _visible_gpus(self, count: int) -> list[str]:
        """The GPUs this launcher may use: the parent's CUDA_VISIBLE_DEVICES when set (a node split gives the
        rollout side its own GPUs; physical ids from 0 would land on the trainer's), else 0 .. count - 1."""
        visible = self.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is not None and visible.strip():
            return [g.strip() for g in visible.split(",") if g.strip()]
        return [str(i) for i in range(count)]

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    @property
    def router_url(self) -> str | None:
        return f"http://{self.host}:{self.router_port}" if self.router else None

    def _server_cmd(self, i: int) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, **self.env)
        if self.backend == "local":
            cmd = [
                sys.executable,
                "-m",
                "megatron_m2po.rollout.engines.local_server",
                "--model",
                self.model_path,
                "--host",
                self.host,
                "--port",
                str(self.ports[i]),
                "--engine-id",
                f"local@{self.ports[i]}",
                "--seed",
                str(i),
            ]
            env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        else:
            cmd = [
                sys.executable,
                "-m",
                "sglang.launch_server",
                "--model-path",
                self.model_path,
                "--tp",
                str(self.tp),
                "--host",
                self.host,
                "--port",
                str(self.ports[i]),
                "--random-seed",
                str(i),
            ]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_ids[i * self.tp : (i + 1) * self.tp])
            env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)  # behaviour log-probs must be of logits / T
            # /health without a one-token generation: it then answers while paused or updating, so neither the
            # router's health checks nor this launcher's drop a worker the trainer has paused.
            env.setdefault("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "0")
        if self.routed_experts:  # the same flag in 0.5.23 (srt/arg_groups/fields/exec_.py) and local_server
            cmd.append(ROUTED_EXPERTS_FLAG)
        return cmd + self._key_args() + self.extra_args, env

    def _router_cmd(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--host",
            self.host,
            "--port",
            str(self.router_port),
            "--worker-urls",
            *self.urls,
            # The router's own bound (default 1800 s) must not cut a request the client still waits for: a
            # router timeout is a 504 it retries from scratch under the same rid.
            "--request-timeout-secs",
            str(math.ceil(self.request_timeout) + 60),
            *self._key_args(admin=False),  # the router's key for its calls to the workers
        ]

    def _key_args(self, admin: bool = True) -> list[str]:
        args = ["--api-key", self.api_key] if self.api_key else []
        if admin and self.admin_api_key:
            args += ["--admin-api-key", self.admin_api_key]
        return args

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], *, append: bool = False) -> None:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # a restart appends: the log of the run that failed is what the operator needs
            out = open(self.log_dir / f"{name}.log", "a" if append else "w")  # noqa: SIM115 (the child's)
        logger.info("starting %s: %s", name, " ".join(_redacted(cmd)))
        try:
            self.procs[name] = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own copy

    def spawn_server(self, i: int) -> None:
        """(Re)start server i with its command line (EngineSupervisor restarts a failed one this way)."""
        self._spawn(f"server-{i}", *self._server_cmd(i), append=True)

    def reap(self, name: str) -> None:
        """Collect an exited server's process (its group killed first, so nothing of it is left)."""
        proc = self.procs.get(name)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def start(self, timeout: float = 900.0) -> list[str]:
        """Start every server, wait for /health, then the router's /readiness (its workers registered and
        healthy: its /health is liveness only); returns the server URLs."""
        for i in range(self.servers):
            self._spawn(f"server-{i}", *self._server_cmd(i))
        self._wait([(f"server-{i}", u) for i, u in enumerate(self.urls)], timeout)
        if self.router:
            self._spawn("router", self._router_cmd(), dict(os.environ))
            self._wait([("router", self.router_url)], timeout, path="/readiness")
        return self.urls

    def _wait(self, named_urls: list[tuple[str, str]], timeout: float, path: str = "/health") -> None:
        deadline = time.monotonic() + timeout
        pending = dict(named_urls)
        while pending:
            for name, url in list(pending.items()):
                code = self.procs[name].poll()
                if code is not None:
                    self.stop()
                    where = f" (log: {self.log_dir / (name + '.log')})" if self.log_dir else ""
                    raise RuntimeError(
                        f"{name} at {url} exited with code {code} before becoming healthy{where}"
                    )
                if is_healthy(url, path=path):
                    pending.pop(name)
            if pending and time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"not healthy after {timeout}s: {sorted(pending)}")
            time.sleep(0.2)

    def engines(self, **kwargs) -> list[SGLangEngine]:
        """One SGLangEngine per server (what the NCCL weight sync needs: each has its own ranks)."""
        return [
            SGLangEngine(u, engine_id=f"{self.backend}@{p}", **self._client_keys(), **kwargs)
            for u, p in zip(self.urls, self.ports)
        ]

    def router_engine(self, **kwargs) -> SGLangEngine:
        """One SGLangEngine for the whole node: generation through the router, control calls to every server."""
        if not self.router:
            raise RuntimeError("EngineLauncher: started without router=True")
        return SGLangEngine(
            self.router_url,
            worker_urls=self.urls,
            engine_id=f"router@{self.router_port}",
            **self._client_keys(),
            **kwargs,
        )

    def _client_keys(self) -> dict[str, str | None]:
        return {"api_key": self.api_key, "admin_api_key": self.admin_api_key}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one server's process group (tests kill engines mid-request)."""
        os.killpg(self.procs[name].pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> EngineLauncher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
