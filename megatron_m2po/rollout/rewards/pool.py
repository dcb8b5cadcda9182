"""A process pool for reward functions with a per-sample timeout enforced by the parent.

Why not concurrent.futures: a ProcessPoolExecutor cannot kill one hung worker (sympy on
`10^{10^{10}}` never returns), and a crashed worker breaks the whole executor. Here every
worker process has a parent-side thread that sends it one sample at a time over a pipe and
waits at most `timeout` seconds; on timeout or crash the worker is SIGKILLed and replaced,
the sample scores 0 and is counted. Hostile model output can cost at most `timeout`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from megatron_m2po import console

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]
DEFAULT_REWARD = "megatron_m2po.rollout.rewards:math_reward"


def load_reward_fn(path: str) -> RewardFn:
    """Import `module:function` (or `module.function`); errors name the path and what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {attr!r} is not callable")
    return fn


def _worker_main(conn, fn_path: str, fn_kwargs: dict[str, Any]) -> None:
    """Worker process loop: receive (response, answer), send back ("ok", score) or ("error", message)."""
    console.apply_inherited()  # the parent's console filters (math-verify's "Timeout is disabled")
    fn = load_reward_fn(fn_path)
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        response, answer = item
        try:
            conn.send(("ok", float(fn(response, answer, **fn_kwargs))))
        except Exception as e:  # a reward bug or odd input must score 0, not kill the worker
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    """One worker process and the pipe to it; restarted by the parent after a timeout or crash."""

    def __init__(self, ctx, fn_path: str, fn_kwargs: dict[str, Any]):
        self._ctx, self._fn_path, self._fn_kwargs = ctx, fn_path, fn_kwargs
        self.process = None
        self.conn = None
        self.ready = False
        self.start()

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self.process = self._ctx.Process(
            target=_worker_main, args=(child, self._fn_path, self._fn_kwargs), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported the reward function, so import time never counts as a timeout."""
        if self.ready:
            return
        if not self.conn.poll(timeout):
            raise RuntimeError(f"reward worker did not start within {timeout}s")
        tag, _ = self.conn.recv()
        if tag != "ready":
            raise RuntimeError(f"reward worker sent {tag!r} before 'ready'")
        self.ready = True

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(timeout=5)
        if self.conn is not None:
            self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(timeout=2)
        except (OSError, BrokenPipeError):
            pass
        self.kill()


class RewardPool:
    """Score (response, answer) pairs with `fn` in `workers` processes, `timeout` seconds per sample.

    `fn` is an import path `module:function` with signature `(response: str, answer: str) -> float`;
    `fn_kwargs` are passed to it (e.g. `{"format_reward": 0.1}` for the paper's format reward).
    Failures (exceptions, crashes) and timeouts score 0.0 and are counted in `metrics()`.
    """

    def __init__(
        self,
        fn: str = DEFAULT_REWARD,
        workers: int = 2,
        timeout: float = 5.0,
        *,
        fn_kwargs: dict[str, Any] | None = None,
        start_method: str = "spawn",
        startup_timeout: float = 120.0,
    ):
        if workers < 1:
            raise ValueError(f"RewardPool: workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"RewardPool: timeout must be > 0 seconds, got {timeout}")
        load_reward_fn(fn)  # fail here, in the caller, on a bad path
        self.fn_path, self.timeout, self.startup_timeout = fn, float(timeout), float(startup_timeout)
        self._fn_kwargs = dict(fn_kwargs or {})
        self._tasks: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._counts = {"scored": 0, "failures": 0, "timeouts": 0, "restarts": 0}
        self._seconds = 0.0
        self._closed = False
        ctx = mp.get_context(start_method)
        self._workers = [_Worker(ctx, fn, self._fn_kwargs) for _ in range(workers)]
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), name=f"reward-worker-{i}", daemon=True)
            for i, w in enumerate(self._workers)
        ]
        for t in self._threads:
            t.start()

    # -- parent side -------------------------------------------------------------------------------
    def _serve(self, worker: _Worker) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            response, answer, future = task
            if future.set_running_or_notify_cancel():
                future.set_result(self._score_one(worker, response, answer))

    def _score_one(self, worker: _Worker, response: str, answer: str) -> float:
        outcome, detail = "ok", None
        try:
            worker.wait_ready(self.startup_timeout)
        except (RuntimeError, EOFError, OSError) as e:
            outcome, detail = "crash", f"worker failed to start: {e}"
        t0 = time.perf_counter()
        try:
            if outcome == "ok":
                worker.conn.send((response, answer))
                if worker.conn.poll(self.timeout):
                    outcome, detail = worker.conn.recv()
                else:
                    outcome, detail = "timeout", f"no answer within {self.timeout}s"
        except (EOFError, OSError, BrokenPipeError) as e:
            outcome, detail = "crash", f"worker died: {type(e).__name__}: {e}"
        with self._lock:
            self._seconds += time.perf_counter() - t0
            self._counts["scored"] += 1
            if outcome == "ok":
                return float(detail)
            self._counts["timeouts" if outcome == "timeout" else "failures"] += 1
        logger.warning(
            "reward %s for answer %r (response %d chars, tail %r): %s; scored 0",
            outcome,
            str(answer)[:80],
            len(response),
            response[-80:],
            detail,
        )
        if outcome in ("timeout", "crash") and not self._closed:
            worker.kill()
            worker.start()
            with self._lock:
                self._counts["restarts"] += 1
        return 0.0

    def submit(self, response: str, answer: str) -> Future:
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        future: Future = Future()
        self._tasks.put((str(response), str(answer), future))
        return future

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Scores in input order; blocks until all are scored (each in at most `timeout` seconds of work)."""
        if len(responses) != len(answers):
            raise ValueError(f"RewardPool.score: {len(responses)} responses but {len(answers)} answers")
        futures = [self.submit(r, a) for r, a in zip(responses, answers)]
        return [f.result() for f in futures]

    async def score_async(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError(f"RewardPool.score_async: {len(responses)} responses but {len(answers)} answers")
        futures = [asyncio.wrap_future(self.submit(r, a)) for r, a in zip(responses, answers)]
        return list(await asyncio.gather(*futures))

    def metrics(self) -> dict[str, float]:
        with self._lock:
            n = max(self._counts["scored"], 1)
            return {
                "reward/scored": float(self._counts["scored"]),
                "reward/failures": float(self._counts["failures"]),
                "reward/timeouts": float(self._counts["timeouts"]),
                "reward/worker_restarts": float(self._counts["restarts"]),
                "reward/seconds_per_sample": self._seconds / n,
            }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
        for w in self._workers:  # first, so a call still running (nobody waits for it now) ends at once
            w.stop()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
