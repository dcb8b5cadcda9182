"""The bounded-staleness replay queue and its journal (docs/queue.md)."""

from megatron_m2po.queue.journal import JournalCorruptError, JournalError, JournalFormatError
from megatron_m2po.queue.replay_queue import MODES, QueueClosed, QueueFull, ReplayQueue, StalenessViolation

__all__ = [
    "MODES",
    "JournalCorruptError",
    "JournalError",
    "JournalFormatError",
    "QueueClosed",
    "QueueFull",
    "ReplayQueue",
    "StalenessViolation",
]
