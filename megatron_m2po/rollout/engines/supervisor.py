"""Keep a node's engine servers up: restart one that exits or stops answering, with backoff and a budget.

`m2po engines` runs `EngineSupervisor.run()` after the launcher has started every server. Each server is probed
every `check_interval` seconds (`GET /health`, at most `health_timeout` seconds); a server that exited, or
failed `unhealthy_after` probes in a row (hung, e.g. SIGSTOPped or deadlocked: it is killed first), is
restarted with the same command line after a backoff that doubles with each restart in the last
`restart_window` seconds (from `backoff` to `backoff_max`). A server restarted `max_restarts` times within
the window is left down and said so; when every server is left down the supervisor stops with an error.

A restarted server holds its start-up weights, not the trainer's: the trainer's farm finds that from its
`weight_version` and keeps it out of rotation until it holds the current version (docs/rollout.md, "Failure
model"). Behind sglang-router the supervisor removes a failed server from the router at once (the router's
own health checks take minutes) and adds it back only when its `weight_version` equals the newest one the
node's other servers serve, so the router's view and the farm's agree.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field, fields

from megatron_m2po.net import is_healthy
from megatron_m2po.rollout.engines.router_workers import RouterError, RouterWorkers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """How fast a failure is seen and how often a server is restarted; each field is the `m2po engines` flag
    of the same name (`--check-interval`, `--health-timeout`, ...)."""

    check_interval: float = 5.0  # seconds between probes of one server
    health_timeout: float = 10.0  # seconds a probe waits for /health
    unhealthy_after: int = 3  # failed probes in a row before a live server is killed and restarted
    backoff: float = 2.0  # seconds before the first restart; doubles per restart within the window
    backoff_max: float = 120.0
    max_restarts: int = 5  # restarts of one server within restart_window; then it is left down (0: never)
    restart_window: float = 3600.0
    start_timeout: float = 900.0  # seconds a restarted server has to become healthy

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            floor_ok = value >= 0 if f.name == "max_restarts" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not floor_ok:
                need = ">= 0" if f.name == "max_restarts" else "> 0"
                raise ValueError(f"--{f.name.replace('_', '-')} must be a number {need}, got {value!r}")
        if self.backoff_max < self.backoff:
            raise ValueError(f"--backoff-max ({self.backoff_max}) must be >= --backoff ({self.backoff})")
        if not float(self.unhealthy_after).is_integer() or not float(self.max_restarts).is_integer():
            raise ValueError("--unhealthy-after and --max-restarts must be whole numbers")

    def delay(self, recent_restarts: int) -> float:
        return min(self.backoff * 2 ** min(recent_restarts, 30), self.backoff_max)


UP, WAITING, STARTING, REJOINING, FAILED = "up", "waiting", "starting", "rejoining", "failed"


@dataclass
class _Server:
    name: str
    index: int
    url: str
    state: str = UP
    misses: int = 0  # failed probes in a row
    restarts: list[float] = field(default_factory=list)  # when each restart was started
    since: float = 0.0  # when the current state began
    restart_at: float = 0.0


class EngineSupervisor:
    """Supervise the servers of a started `EngineLauncher` (sglang_launcher.py)."""

    def __init__(self, launcher, policy: RestartPolicy | None = None, *, clock=time.monotonic):
        self.launcher, self.policy, self.clock = launcher, policy or RestartPolicy(), clock
        self.servers = [_Server(f"server-{i}", i, url) for i, url in enumerate(launcher.urls)]
        self.router = (
            RouterWorkers(launcher.router_url, worker_api_key=launcher.api_key) if launcher.router else None
        )
        self.total_restarts = 0

    # -- what an operator reads ------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "engines_up": float(sum(s.state == UP for s in self.servers)),
            "engines_down": float(sum(s.state != UP for s in self.servers)),
            "engines_failed": float(sum(s.state == FAILED for s in self.servers)),
            "restarts": float(self.total_restarts),
        }

    def states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.servers}

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Supervise until every server is left down (RuntimeError) or the process is stopped."""
        while True:
            self.poll()
            if all(s.state == FAILED for s in self.servers):
                raise RuntimeError(
                    f"every engine server failed more than --max-restarts={self.policy.max_restarts} times "
                    f"within {self.policy.restart_window}s; see their logs"
                )
            time.sleep(self.policy.check_interval)

    def poll(self) -> None:
        """One pass over the servers: probe, restart what is due, bring back what is ready."""
        for server in self.servers:
            try:
                self._step(server)
            except RouterError as e:  # the router is the launcher's too: report and try again next pass
                logger.error("%s: router worker call failed: %s", server.name, e)

    def _step(self, s: _Server) -> None:
        proc, now = self.launcher.procs.get(s.name), self.clock()
        if s.state == FAILED:
            return
        if s.state == WAITING:
            if now >= s.restart_at:
                self._restart(s)
            return
        code = proc.poll() if proc is not None else -1
        if code is not None:
            self._down(s, f"exited with code {code}")
            return
        healthy = is_healthy(s.url, timeout=self.policy.health_timeout)
        if s.state == STARTING:
            if healthy:
                logger.warning(
                    "%s (%s) is back: healthy %.1fs after its restart", s.name, s.url, now - s.since
                )
                self._enter(s, REJOINING if self.router else UP)
            elif now - s.since > self.policy.start_timeout:
                self._kill(s)
                self._down(
                    s, f"not healthy within --start-timeout={self.policy.start_timeout}s of its restart"
                )
            return
        s.misses = 0 if healthy else s.misses + 1
        if s.misses >= self.policy.unhealthy_after:
            self._kill(s)
            self._down(
                s,
                f"did not answer /health within {self.policy.health_timeout}s {s.misses} times in a row "
                "(hung): killed",
            )
            return
        if s.state == REJOINING and healthy:
            self._rejoin(s)

    # -- transitions -----------------------------------------------------------------------------------
    def _enter(self, s: _Server, state: str) -> None:
        s.state, s.since, s.misses = state, self.clock(), 0

    def _down(self, s: _Server, why: str) -> None:
        if self.router is not None:
            self.router.remove(s.url)  # at once: the router's own health checks take minutes
        now = self.clock()
        s.restarts = [t for t in s.restarts if now - t < self.policy.restart_window]
        if len(s.restarts) >= self.policy.max_restarts:
            logger.error(
                "%s (%s) %s; %d restarts within %ss (--max-restarts): left down",
                s.name,
                s.url,
                why,
                len(s.restarts),
                self.policy.restart_window,
            )
            self._enter(s, FAILED)
            return
        delay = self.policy.delay(len(s.restarts))
        logger.warning(
            "%s (%s) %s; restart %d/%d in %.1fs",
            s.name,
            s.url,
            why,
            len(s.restarts) + 1,
            self.policy.max_restarts,
            delay,
        )
        self._enter(s, WAITING)
        s.restart_at = now + delay

    def _restart(self, s: _Server) -> None:
        self.launcher.reap(s.name)
        self.launcher.spawn_server(s.index)
        s.restarts.append(self.clock())
        self.total_restarts += 1
        self._enter(s, STARTING)

    def _kill(self, s: _Server) -> None:
        proc = self.launcher.procs.get(s.name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logger.error("%s: pid %d did not exit 30s after SIGKILL", s.name, proc.pid)

    def _rejoin(self, s: _Server) -> None:
        """Back into the router once it serves the weight version its peers in the router serve."""
        peers = [p for p in self.servers if p is not s and p.state == UP]
        mine = self._weight_version(s.url)
        wanted = max((self._weight_version(p.url) for p in peers), default=mine)
        if mine is None or wanted is None or mine != wanted:
            return
        self.router.add(s.url)
        logger.warning("%s (%s) rejoins the router at weight version %s", s.name, s.url, mine)
        self._enter(s, UP)

    def _weight_version(self, url: str) -> int | None:
        """The server's `weight_version` (-1 for start-up weights), None when it does not answer."""
        headers = {"Authorization": f"Bearer {self.launcher.api_key}"} if self.launcher.api_key else {}
        request = urllib.request.Request(f"{url}/model_info", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.policy.health_timeout) as r:
                version = json.loads(r.read()).get("weight_version")
        except (OSError, ValueError, AttributeError):
            return None
        try:
            return int(version)
        except (TypeError, ValueError):
            return -1  # "default": the weights the server started with
