"""A pool of sandboxed Python tool calls, so tool calls from many trajectories run side by side.

Each call is a fresh sandbox process (nothing a call does survives it), started from one of `workers`
threads that only wait on it: the asyncio rollout loop awaits `run_async` without blocking, and at most
`workers` calls run at once (the rest wait their turn). A call that fails in any way is a `ToolResult`.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from megatron_m2po.config import SandboxConfig
from megatron_m2po.rollout.tools.sandbox import Sandbox, ToolResult

_CLOSED = ToolResult("", "", error="the Python tool pool is closed")


class SandboxPool:
    """`config.workers` calls at once, each bounded by the config's limits (or `timeout` seconds of wall
    time). Raises SandboxUnavailable on construction where the machine cannot isolate (see Sandbox)."""

    def __init__(self, config: SandboxConfig | None = None):
        self.sandbox = Sandbox(config)
        self.config = self.sandbox.config
        self._executor = ThreadPoolExecutor(self.config.workers, thread_name_prefix="python-tool")
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "errors": 0, "wall": 0, "cpu": 0, "memory": 0, "output": 0}
        self._seconds = 0.0
        self._closed = False

    @property
    def capabilities(self):
        return self.sandbox.capabilities

    def submit(self, code: str, timeout: float | None = None) -> Future:
        """A Future of the call's ToolResult (a closed pool answers with an error result)."""
        try:
            if not self._closed:
                return self._executor.submit(self._call, code, timeout)
        except RuntimeError:  # closed meanwhile
            pass
        future: Future = Future()
        future.set_result(_CLOSED)
        return future

    def run(self, code: str, timeout: float | None = None) -> ToolResult:
        return self.submit(code, timeout).result()

    async def run_async(self, code: str, timeout: float | None = None) -> ToolResult:
        """Await one call from the event loop; never raises for the code's or the sandbox's failure."""
        return await asyncio.wrap_future(self.submit(code, timeout))

    def _call(self, code: str, timeout: float | None) -> ToolResult:
        if self._closed:  # queued before close(): answered at once, not run
            return _CLOSED
        result = self.sandbox.run(code, timeout)
        with self._lock:
            self._counts["calls"] += 1
            self._seconds += result.wall_seconds
            if result.error:
                self._counts["errors"] += 1
            if result.limit:
                self._counts[result.limit] += 1
        return result

    def metrics(self) -> dict[str, float]:
        with self._lock:
            c = self._counts
            out = {
                "tool/calls": float(c["calls"]),
                "tool/errors": float(c["errors"]),
                "tool/seconds_per_call": self._seconds / max(c["calls"], 1),
            }
            out.update({f"tool/limit_{name}": float(c[name]) for name in ("wall", "cpu", "memory", "output")})
            return out

    def close(self) -> None:
        """Wait for the calls in flight (each ends within its wall limit); calls still queued are answered
        with an error result, not run."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
