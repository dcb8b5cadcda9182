"""The bounded-staleness replay queue and its journal (docs/queue.md)."""

from megatron_m2po.queue.admission import StalenessViolation
from megatron_m2po.queue.journal import JournalCorruptError, JournalError, JournalFormatError
from megatron_m2po.queue.replay_queue import QueueClosed, QueueFull, ReplayQueue

__all__ = [
    "JournalCorruptError",
    "JournalError",
    "JournalFormatError",
    "QueueClosed",
    "QueueFull",
    "ReplayQueue",
    "StalenessViolation",
]
