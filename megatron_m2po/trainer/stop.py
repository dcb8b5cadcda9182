"""A request to stop the run early (SIGTERM: a scheduler's pre-emption), asked at the loop's safe points.

Every mode honours it: no new work starts once it is seen, a step that has not trained yet ends before its
first update (the checkpoint is then the previous step's state), and a step that has begun finishes, or ends
after its waits' grace period, and is checkpointed. The ranks act on rank 0's view of it, so they stop at
the same point.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from megatron_m2po.trainer.distribute import broadcast_from_rank0

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM (or `request`); the loop asks `requested_collective` between phases and passes
    `ends_wait(...)` to waits for data."""

    # A wait for the rest of a step that has begun gives the producer this long after the request before the
    # step is ended short; a wait at a step's start ends at once.
    GRACE_S = 10.0

    def __init__(self) -> None:
        self.at: float | None = None  # time.monotonic() of the request

    @classmethod
    def on_sigterm(cls) -> StopRequest:
        """A request that SIGTERM sets (the handler is this process's from now on)."""
        stop = cls()

        def handler(signum, frame):
            logger.warning(
                "SIGTERM: checkpointing after this step (sooner if it waits for data), then exiting"
            )
            stop.request()

        signal.signal(signal.SIGTERM, handler)
        return stop

    def request(self) -> None:
        if self.at is None:
            self.at = time.monotonic()

    @property
    def requested(self) -> bool:
        """This rank's view (rank 0's decides)."""
        return self.at is not None

    def requested_collective(self) -> bool:
        """Whether rank 0 was asked to stop: the same answer on every rank."""
        return broadcast_from_rank0(self.requested)

    def ends_wait(self, *, step_begun: bool) -> Callable[[], bool]:
        """For a wait for data on rank 0: true once the request is `GRACE_S` old in a step that has begun
        (its updates so far are kept), at once at a step's start."""
        grace = self.GRACE_S if step_begun else 0.0
        return lambda: self.at is not None and time.monotonic() - self.at >= grace
