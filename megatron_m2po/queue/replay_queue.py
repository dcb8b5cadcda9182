"""The replay queue between the rollout producer and the trainer.

Why it exists: generation may run ahead of training (bounded mode) or lag it by an exact
number of versions (fixed mode, the paper's experiment), but a group must never reach the
loss staler than allowed, and a crash must neither lose nor repeat an accepted group.

Threads: the producer (the asyncio rollout manager, in a background thread) calls
`admit`/`put`/`release`; the trainer (main thread) calls `get_batch`, `publish_version` and
`commit`. One condition variable guards the in-memory state; journal appends happen outside
it so the trainer never waits for a disk write.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from megatron_m2po.queue.admission import admission_rule
from megatron_m2po.queue.codec import CodecError, VersionRange, decode_group, encode_group, version_range
from megatron_m2po.queue.journal import (
    FSYNC_POLICIES,
    RETIRED_IDS_FILE,
    JournalError,
    JournalFormatError,
    JournalWriter,
    list_segments,
    read_retired,
    scan_journal,
)
from megatron_m2po.queue.stats import StalenessHistogram
from megatron_m2po.types import Group

logger = logging.getLogger(__name__)

COMMIT_FORMAT = 1
_COUNTERS = ("admitted", "admit_waits", "released", "accepted", "duplicates", "dropped", "consumed")


class QueueClosed(RuntimeError):
    """The queue was closed while a caller waited on it, or is used after `close()`."""


class QueueFull(TimeoutError):
    """`put` without a reservation waited `timeout` seconds for room."""


@dataclass
class _Entry:
    """A queued group with what ordering, staleness and batching need, computed once at `put`."""

    seq: int
    group: Group
    low: int  # oldest token version
    high: int
    tokens: int

    @classmethod
    def of(cls, seq: int, group: Group, vr: VersionRange) -> _Entry:
        return cls(seq, group, vr.low, vr.high, group.num_tokens)

    def __lt__(self, other: _Entry) -> bool:
        # FIFO by version, then by acceptance
        return (self.low, self.seq) < (other.low, other.seq)


class ReplayQueue:
    """Thread-safe, journaled queue of `Group`s with staleness control.

    mode: a staleness mode's name (`megatron_m2po.staleness`); its rule (queue/admission.py) decides
    admission, drops and the check at consumption: "bounded" (admission keeps staleness <= `max_staleness`;
    too-stale groups are dropped and counted), "fixed" (every group consumed at version v must come from
    exactly `max(v - fixed_lag_updates, 0)`; raises `StalenessViolation` otherwise) or "sync" (fixed, lag 0).
    `groups_per_update`: groups the trainer consumes per published version (admission uses it).
    `capacity`: bound on queued + reserved + being-written groups (back-pressure).
    `journal_dir`: None keeps everything in memory (no recovery); otherwise a fresh directory
    (use `ReplayQueue.recover` to reopen one that holds a journal).
    """

    def __init__(
        self,
        mode: str = "bounded",
        *,
        max_staleness: int = 4,
        groups_per_update: int = 1,
        capacity: int = 1024,
        journal_dir: str | os.PathLike | None = None,
        fsync: str = "batch",
        fixed_lag_updates: int = 0,
        fsync_interval_s: float = 1.0,
        segment_bytes: int = 64 << 20,
        logprob_dtype: str = "float32",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        for name, value, low in (
            ("max_staleness", max_staleness, 0),
            ("groups_per_update", groups_per_update, 1),
            ("capacity", capacity, 1),
            ("fixed_lag_updates", fixed_lag_updates, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if capacity < groups_per_update:
            raise ValueError(f"capacity ({capacity}) must be >= groups_per_update ({groups_per_update})")
        self._rule = admission_rule(
            mode, max_staleness=max_staleness, groups_per_update=groups_per_update, fixed_lag_updates=fixed_lag_updates
        )
        self.mode = mode
        self.max_staleness = max_staleness
        self.groups_per_update = groups_per_update
        self.capacity = capacity
        self.fixed_lag_updates = fixed_lag_updates
        self.fsync = fsync
        self._journal_kwargs = dict(
            fsync=fsync, fsync_interval_s=fsync_interval_s, segment_bytes=segment_bytes
        )
        self.logprob_dtype = logprob_dtype

        self._cond = threading.Condition()
        self._journal_lock = threading.Lock()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False
        self._version = 0
        self._consumed_at_version = 0
        self._entries: list[_Entry] = []  # sorted by key
        self._queued_tokens = 0
        self._queued_levels: Counter[int] = Counter()  # queued + being-written groups by oldest version
        self._reserved: Counter[int] = Counter()  # admitted, not yet put, by the version they start at
        self._writing = 0
        self._pending_ids: set[str] = set()
        self._accepted_ids: set[str] = set()
        self._next_seq = 0
        self._low_water = 0  # every seq below it is consumed (or dropped)
        self._consumed_above: set[int] = set()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._staleness = StalenessHistogram()
        self._journal: JournalWriter | None = None
        if journal_dir is not None:
            if list_segments(journal_dir):
                raise JournalError(
                    f"{journal_dir} already holds a journal; reopen it with ReplayQueue.recover(journal_dir, "
                    "committed) or point journal_dir at an empty directory"
                )
            self._journal = JournalWriter(journal_dir, **self._journal_kwargs)

    # ------------------------------------------------------------------ versions
    @property
    def closed(self) -> bool:
        """True once `close()` was called (a producer loop's signal to stop)."""
        return self._closed

    @property
    def version(self) -> int:
        """The trainer's published version (optimizer updates done)."""
        return self._version

    def publish_version(self, version: int) -> None:
        """Trainer: called after each optimizer update; also drops groups that became too stale."""
        with self._cond:
            if version < self._version:
                raise ValueError(f"publish_version({version}): versions only grow (current {self._version})")
            if version != self._version:
                self._version = version
                self._consumed_at_version = 0
            self._drop_stale_locked()
            self._notify_locked()

    # ------------------------------------------------------------------ producer
    def _take_admission_locked(self, num_groups: int, at_version: int) -> bool | None:
        """Reserve `num_groups` started at `at_version` if allowed; None when it can never be."""
        if self._occupied_locked() + num_groups > self.capacity:
            return False
        admitted = self._rule.admit(
            num_groups,
            at_version,
            version=self._version,
            consumed_at_version=self._consumed_at_version,
            pending=self._queued_levels + self._reserved,
        )
        if admitted is None:
            logger.warning(
                "queue: refusing work at version %d: already %d versions behind the trainer (max_staleness %d)",
                at_version,
                self._version - at_version,
                self.max_staleness,
            )
        if not admitted:
            return admitted
        self._reserved[at_version] += num_groups
        self._counters["admitted"] += num_groups
        return True

    def _check_admit_args(self, num_groups: int) -> None:
        if num_groups < 1:
            raise ValueError(f"admit: num_groups must be >= 1, got {num_groups}")
        if num_groups > self.capacity:
            raise ValueError(f"admit: num_groups={num_groups} exceeds capacity {self.capacity}")
        self._rule.check_request(num_groups)

    def admit(self, num_groups: int = 1, timeout: float | None = None, *, version: int | None = None) -> bool:
        """Producer: block until `num_groups` prompts may start; reserves them. False on timeout/close.

        `version`: the policy version the engine will generate with (default: the trainer's
        current version); pass the engine's version when engines lag the trainer.
        """
        self._check_admit_args(num_groups)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            counted = False
            while True:
                decided = self._try_admit_locked(num_groups, version, counted)
                if decided is not None:
                    return decided
                counted = True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)

    async def admit_async(
        self, num_groups: int = 1, timeout: float | None = None, *, version: int | None = None
    ) -> bool:
        """`admit` for the asyncio producer: waits without blocking the event loop; cancel-safe."""
        self._check_admit_args(num_groups)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        counted = False
        while True:
            event = asyncio.Event()
            with self._cond:
                decided = self._try_admit_locked(num_groups, version, counted)
                if decided is not None:
                    return decided
                counted = True
                waiter = (loop, event)
                self._async_waiters.append(waiter)
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return False
            finally:
                with self._cond:
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)

    def _try_admit_locked(self, num_groups: int, version: int | None, counted: bool) -> bool | None:
        """One admission attempt: True (reserved) or False (closed / can never fit) is final; None = wait.

        A wait is counted once per `admit` call (`counted` says it already was)."""
        if self._closed:
            return False
        ok = self._take_admission_locked(num_groups, self._version if version is None else version)
        if ok is None:  # can never be admitted (too far behind the trainer)
            return False
        if ok:
            return True
        if not counted:
            self._counters["admit_waits"] += 1
        return None

    def release(self, num_groups: int = 1, *, version: int | None = None) -> None:
        """Producer: give back reservations of aborted work (the newest ones unless `version` is given)."""
        with self._cond:
            total = sum(self._reserved.values())
            if num_groups > total:
                raise ValueError(f"release({num_groups}): only {total} groups are reserved")
            if version is not None:
                if self._reserved[version] < num_groups:
                    raise ValueError(
                        f"release({num_groups}, version={version}): only {self._reserved[version]} reserved at it"
                    )
                _decrement(self._reserved, version, num_groups)
            else:
                for _ in range(num_groups):
                    _decrement(self._reserved, max(self._reserved))
            self._counters["released"] += num_groups
            self._notify_locked()

    def _use_reservation_locked(self, low: int) -> int | None:
        """Turn one reservation into the group being put (the one started at `low`, else the closest
        older); returns its version, None when nothing is reserved."""
        if not self._reserved:
            return None
        older = [v for v in self._reserved if v <= low]
        chosen = max(older) if older else min(self._reserved)
        _decrement(self._reserved, chosen)
        return chosen

    def put(self, group: Group, *, timeout: float | None = None) -> bool:
        """Producer: journal then enqueue `group`; False (counted) if its prompt_id was already accepted.

        Uses one reservation from `admit` when there is one (accepted or duplicate alike; if
        `put` raises, the reservation is left for the caller to `release`); without one, waits
        for room under `capacity` (raises `QueueFull` after `timeout`). Returns only once the
        record is in the journal (and fsynced under fsync="always").
        """
        try:
            if self._journal is not None:
                chunks, vr = encode_group(group, logprob_dtype=self.logprob_dtype)
            else:
                chunks, vr = None, version_range(group)
        except CodecError as e:
            raise ValueError(f"put: cannot store group {getattr(group, 'prompt_id', group)!r}: {e}") from e
        pid = group.prompt_id
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._check_open()
            reservation = self._use_reservation_locked(vr.low)
            if pid in self._accepted_ids or pid in self._pending_ids:
                self._counters["duplicates"] += 1
                logger.info("queue: duplicate prompt_id %r not accepted again", pid)
                self._notify_locked()
                return False
            while reservation is None and self._occupied_locked() >= self.capacity:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise QueueFull(f"put: queue at capacity {self.capacity} for {timeout} s")
                self._cond.wait(remaining)
                self._check_open()
                if pid in self._accepted_ids or pid in self._pending_ids:
                    self._counters["duplicates"] += 1
                    return False
            self._pending_ids.add(pid)
            self._writing += 1
            self._queued_levels[vr.low] += 1
        try:
            with self._journal_lock:
                seq = self._next_seq
                if self._journal is not None:
                    self._journal.append(seq, chunks, pid)
                self._next_seq = seq + 1
        except BaseException:
            with self._cond:
                self._pending_ids.discard(pid)
                self._writing -= 1
                _decrement(self._queued_levels, vr.low)
                if reservation is not None:
                    self._reserved[reservation] += 1
                self._notify_locked()
            raise
        with self._cond:
            self._pending_ids.discard(pid)
            self._writing -= 1
            self._accepted_ids.add(pid)
            self._counters["accepted"] += 1
            self._insert_locked(_Entry.of(seq, group, vr), count_level=False)
            self._notify_locked()
        return True

    async def put_async(self, group: Group) -> bool:
        """`put` from the event loop without blocking it on encoding and disk I/O."""
        return await asyncio.to_thread(self.put, group)

    # ------------------------------------------------------------------ consumer
    def _ready_count_locked(self, num_groups: int | None, max_tokens: int | None) -> int:
        entries = self._entries
        if max_tokens is None:
            return num_groups if len(entries) >= num_groups else 0
        limit = len(entries) if num_groups is None else min(num_groups, len(entries))
        tokens = 0
        for i in range(limit):
            t = entries[i].tokens
            if tokens + t > max_tokens:
                if i == 0:
                    logger.warning(
                        "queue: group %r has %d tokens > max_tokens=%d; returning it alone",
                        entries[0].group.prompt_id,
                        t,
                        max_tokens,
                    )
                    return 1
                return i  # the next group does not fit: the batch is full
            tokens += t
        if num_groups is not None and limit == num_groups:
            return limit
        return limit if tokens == max_tokens else 0

    def get_batch(
        self, num_groups: int | None = None, *, max_tokens: int | None = None, timeout: float | None = None
    ) -> list[Group]:
        """Trainer: the oldest complete batch, FIFO by version; [] after `timeout` seconds.

        By count (`num_groups`, default `groups_per_update`), by tokens (`max_tokens`: as many
        oldest groups as fit; waits until the next group would not fit), or both.
        """
        if num_groups is None and max_tokens is None:
            num_groups = self.groups_per_update
        if num_groups is not None:
            if num_groups < 1 or num_groups > self.capacity:
                raise ValueError(
                    f"get_batch: num_groups must be in [1, capacity={self.capacity}], got {num_groups}"
                )
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"get_batch: max_tokens must be >= 1, got {max_tokens}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_stale_locked()
                n = self._ready_count_locked(num_groups, max_tokens)
                if n:
                    return self._pop_batch_locked(n)
                if self._closed:
                    raise QueueClosed("get_batch: the queue is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _pop_batch_locked(self, n: int) -> list[Group]:
        batch = self._entries[:n]
        self._rule.check_consumed(((e.group.prompt_id, e.low, e.high) for e in batch), self._version)
        del self._entries[:n]
        for e in batch:
            self._remove_entry_locked(e)
            self._staleness.add_group(e.group, self._version)
        self._counters["consumed"] += n
        self._consumed_at_version += n
        self._notify_locked()
        return [e.group for e in batch]

    def _drop_stale_locked(self) -> None:
        oldest_fresh = self._rule.oldest_fresh(self._version)
        if oldest_fresh is None:
            return
        # entries are sorted by low: the stale ones (low < oldest_fresh) are a prefix
        stale = bisect.bisect_left(self._entries, oldest_fresh, key=lambda e: e.low)
        if not stale:
            return
        dropped, self._entries[:stale] = self._entries[:stale], []
        for e in dropped:
            self._remove_entry_locked(e)
            self._counters["dropped"] += 1
            logger.warning(
                "queue: dropped group %r: staleness %d > max_staleness %d (produced by version %d, trainer at %d)",
                e.group.prompt_id,
                self._version - e.low,
                self.max_staleness,
                e.low,
                self._version,
            )
        self._notify_locked()

    # ------------------------------------------------------------------ bookkeeping
    def _insert_locked(self, entry: _Entry, *, count_level: bool = True) -> None:
        bisect.insort(self._entries, entry)
        self._queued_tokens += entry.tokens
        if count_level:
            self._queued_levels[entry.low] += 1

    def _occupied_locked(self) -> int:
        """Groups counted against `capacity`: queued, being written, and reserved."""
        return len(self._entries) + self._writing + sum(self._reserved.values())

    def _remove_entry_locked(self, entry: _Entry) -> None:
        self._queued_tokens -= entry.tokens
        _decrement(self._queued_levels, entry.low)
        self._consumed_above.add(entry.seq)
        self._advance_low_water_locked()

    def _advance_low_water_locked(self) -> None:
        while self._low_water in self._consumed_above:
            self._consumed_above.remove(self._low_water)
            self._low_water += 1

    def _notify_locked(self) -> None:
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its waiter is gone
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed("the replay queue is closed")

    # ------------------------------------------------------------------ checkpointing
    def commit(self) -> dict[str, Any]:
        """JSON-able consumption state to save inside the trainer checkpoint.

        Makes the journal durable first (fsync "batch"/"always"). Nothing is deleted here: once
        checkpoints are saved, call `gc` with the commit of the OLDEST checkpoint kept, so a fallback
        to any kept checkpoint still finds every group it needs.
        """
        with self._journal_lock:
            if self._journal is not None:
                self._journal.sync()
            with self._cond:
                state = {
                    "format": COMMIT_FORMAT,
                    "journal_id": self._journal.journal_id.hex() if self._journal is not None else None,
                    "version": self._version,
                    "next_seq": self._next_seq,
                    "low_water": self._low_water,
                    "consumed_above": sorted(self._consumed_above),
                    "counters": dict(self._counters),
                }
        return state

    def gc(self, committed: dict[str, Any]) -> int:
        """Delete journal segments fully consumed by `committed`; bytes freed.

        `committed` must be the commit of the oldest checkpoint that may still be resumed from (with
        `checkpoint.keep_last` = k, the oldest of the k kept): what it has not consumed stays.
        """
        _validate_commit(committed)
        if self._journal is None:
            return 0
        if committed["journal_id"] != self._journal.journal_id.hex():
            raise JournalFormatError(f"gc: commit belongs to journal {committed['journal_id']}, not this one")
        with self._journal_lock:
            return self._journal.delete_segments_before(committed["low_water"])

    @classmethod
    def recover(
        cls, journal_dir: str | os.PathLike, committed: dict[str, Any] | None = None, **kwargs: Any
    ) -> ReplayQueue:
        """Reopen the journal in `journal_dir` and re-queue exactly the groups accepted but not consumed by `committed`.

        `committed` is what `commit()` returned for the checkpoint being resumed (None: replay
        every record). A torn tail is truncated with a warning; corruption elsewhere raises
        `JournalCorruptError`; records the commit needs but the journal lacks raise `JournalError`.
        kwargs: the constructor's (mode, max_staleness, ...), except journal_dir.
        """
        if "journal_dir" in kwargs:
            raise TypeError("recover: pass the journal directory as the first argument, not journal_dir=")
        if committed is not None:
            _validate_commit(committed)
        queue = cls(**kwargs)
        scan = scan_journal(journal_dir, repair=True)
        if committed is not None and committed["journal_id"] is not None and scan.journal_id is not None:
            if committed["journal_id"] != scan.journal_id.hex():
                raise JournalFormatError(
                    f"recover: the checkpoint's queue commit belongs to journal {committed['journal_id']}, but "
                    f"{journal_dir} holds journal {scan.journal_id.hex()}"
                )
        retired = read_retired(journal_dir, repair=True)
        if committed is None:
            low_water = scan.records[0].seq if scan.records else 0
            consumed: set[int] = set()
            next_seq = low_water
        else:
            low_water, next_seq = committed["low_water"], committed["next_seq"]
            consumed = set(committed["consumed_above"])
            _refuse_retired_needs(journal_dir, retired, low_water, consumed)
            present = {r.seq for r in scan.records}
            missing = [s for s in range(low_water, next_seq) if s not in consumed and s not in present]
            if missing:
                raise JournalError(
                    f"recover: {len(missing)} group(s) accepted before the checkpoint but not consumed by it are "
                    f"missing from {journal_dir} (first missing seq {missing[0]}): the journal was deleted, "
                    "truncated, or written with fsync='never' before a power loss"
                )
            queue._version = committed["version"]
            queue._counters.update({k: committed["counters"].get(k, 0) for k in _COUNTERS})
        queue._accepted_ids |= retired.keys()
        replayed = 0
        for record in scan.records:
            try:
                group = decode_group(record.payload)
            except CodecError as e:
                raise JournalError(
                    f"recover: record seq {record.seq} in {record.path} at byte offset {record.offset} passed its "
                    f"checksum but cannot be decoded: {e}"
                ) from e
            record.segment.prompt_ids.append(group.prompt_id)
            record.segment.seqs.append(record.seq)
            if group.prompt_id in queue._accepted_ids:
                queue._counters["duplicates"] += 1
                logger.warning(
                    "recover: journal holds prompt_id %r twice; replaying it once", group.prompt_id
                )
                consumed.add(record.seq)
                continue
            queue._accepted_ids.add(group.prompt_id)
            if record.seq >= next_seq:  # accepted after the commit: its counters do not include it
                queue._counters["accepted"] += 1
            if record.seq < low_water or record.seq in consumed:
                continue
            queue._insert_locked(_Entry.of(record.seq, group, version_range(group)))
            replayed += 1
        queue._next_seq = max(next_seq, scan.records[-1].seq + 1 if scan.records else 0)
        queue._low_water = low_water
        queue._consumed_above = {s for s in consumed if s >= low_water}
        queue._advance_low_water_locked()
        queue._journal = JournalWriter(
            journal_dir, journal_id=scan.journal_id, segments=scan.segments, **queue._journal_kwargs
        )
        logger.info(
            "recover: %d group(s) re-queued from %s (%d records on disk, %d torn tail bytes skipped)",
            replayed,
            journal_dir,
            len(scan.records),
            scan.torn_tail_bytes,
        )
        return queue

    # ------------------------------------------------------------------ introspection
    def accepted_prompt_ids(self) -> set[str]:
        """Every prompt_id accepted by this queue or found in its journal (skip these after a restart)."""
        with self._cond:
            return set(self._accepted_ids) | self._pending_ids

    def queued_prompt_ids(self) -> list[str]:
        """prompt_ids waiting to be consumed, in consumption order."""
        with self._cond:
            return [e.group.prompt_id for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def metrics(self) -> dict[str, float]:
        """`queue/` metrics: counts are cumulative (across restarts); staleness covers groups consumed since the last call."""
        with self._cond:
            out = {
                "queue/version": float(self._version),
                "queue/depth": float(len(self._entries)),
                "queue/depth_tokens": float(self._queued_tokens),
                "queue/inflight": float(sum(self._reserved.values()) + self._writing),
                **{f"queue/{k}": float(v) for k, v in self._counters.items()},
                **self._staleness.metrics(),
            }
            self._staleness.reset()
        journal = self._journal
        out["queue/journal_bytes"] = float(journal.bytes_on_disk if journal else 0)
        out["queue/journal_bytes_written"] = float(journal.bytes_written if journal else 0)
        out["queue/journal_segments"] = float(len(journal.segments) if journal else 0)
        return out

    def close(self) -> None:
        """Wake every waiter (admit returns False, get_batch raises QueueClosed) and close the journal."""
        with self._cond:
            self._closed = True
            self._notify_locked()
        with self._journal_lock:
            if self._journal is not None:
                self._journal.close()

    def __enter__(self) -> ReplayQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decrement(counter: Counter[int], key: int, n: int = 1) -> None:
    """Subtract `n` from `counter[key]`, deleting the key at zero (so the counter holds only live keys)."""
    counter[key] -= n
    if not counter[key]:
        del counter[key]


def _refuse_retired_needs(journal_dir, retired: dict[str, int | None], low_water: int, consumed: set[int]) -> None:
    """Raise if GC retired a group this commit has not consumed (it was collected for a newer checkpoint)."""
    needed = sorted(s for s in retired.values() if s is not None and s >= low_water and s not in consumed)
    if needed:
        raise JournalError(
            f"recover: {os.path.join(journal_dir, RETIRED_IDS_FILE)} retires {len(needed)} group(s) this "
            f"checkpoint has not consumed (seq {needed[0]} and later; its commit consumed all below seq "
            f"{low_water}): the journal was collected for a newer checkpoint, so resuming from this one would "
            "lose them; resume from a newer checkpoint"
        )


def _validate_commit(committed: dict[str, Any]) -> None:
    if not isinstance(committed, dict):
        raise ValueError(
            f"queue commit state must be the dict returned by commit(), got {type(committed).__name__}"
        )
    for key in ("format", "journal_id", "version", "next_seq", "low_water", "consumed_above", "counters"):
        if key not in committed:
            raise ValueError(
                f"queue commit state is missing key {key!r} (was it produced by ReplayQueue.commit()?)"
            )
    if committed["format"] != COMMIT_FORMAT:
        raise ValueError(
            f"queue commit state format {committed['format']} is not supported (expected {COMMIT_FORMAT})"
        )
