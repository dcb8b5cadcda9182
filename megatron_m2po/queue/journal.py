"""Append-only, checksummed, segmented journal of accepted groups.

Why: a group accepted by the replay queue must survive a crash of the trainer (it cost
GPU-minutes to generate) and must be replayed exactly once. Each accepted group is one
record, written to the OS (and fsynced per policy) before `put` returns. Segments let the
queue delete what the trainer has consumed and checkpointed, so disk use stays bounded.

On-disk format (little-endian), version 1:

    segment file  segment-<index:08d>.m2poj
      header  36 bytes: magic b"M2POJRNL" | u16 format version | u16 header size (36)
                        | u32 flags (0) | 16-byte journal id (uuid4) | 4 bytes reserved
      records, each:
        u32 RECORD_MARK (b"M2PR") | u32 payload length | u32 crc32(payload) | u32 crc32(first 12 bytes)
        payload: u64 seq | the group encoded by `codec.encode_group`

Damage at the end of the LAST segment (a record cut by kill -9 or a power loss, or garbage
after it) is a torn tail: the reader warns, and `repair=True` truncates it away. Damage
followed by any valid record is corruption in the middle: `JournalCorruptError` names the
file and byte offset, because skipping it would silently lose acknowledged groups.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from megatron_m2po.io_errors import naming_write_errors

logger = logging.getLogger(__name__)

MAGIC = b"M2POJRNL"
FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHI16s4x")
RECORD_MARK = 0x5250324D  # b"M2PR" little-endian
RECORD_HEADER = struct.Struct("<IIII")
SEQ = struct.Struct("<Q")
FSYNC_POLICIES = ("always", "batch", "never")
_SEGMENT_RE = re.compile(r"^segment-(\d{8})\.m2poj$")
RETIRED_IDS_FILE = "retired-prompt-ids.jsonl"


class JournalError(RuntimeError):
    """The journal cannot be used as it is (format, identity, missing records)."""


class JournalFormatError(JournalError):
    """A file is not a journal segment this code can read (magic, format version, journal id)."""


class JournalCorruptError(JournalError):
    """A damaged record followed by valid data: acknowledged groups would be lost by skipping it."""

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(
            f"journal corrupt in {path} at byte offset {offset}: {problem}, and valid records follow it; "
            "refusing to skip acknowledged groups (restore the file or move it away deliberately)"
        )
        self.path = path
        self.offset = offset


def segment_name(index: int) -> str:
    return f"segment-{index:08d}.m2poj"


def list_segments(journal_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(index, path) of the segment files in `journal_dir`, oldest first."""
    root = Path(journal_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _SEGMENT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_journal_file(name: str) -> bool:
    """Whether a file of that name in a journal directory is one the journal writes."""
    return bool(_SEGMENT_RE.match(name)) or name == RETIRED_IDS_FILE


def remove_journal(journal_dir: str | os.PathLike) -> list[Path]:
    """Delete the journal's own files in `journal_dir` (and the directory once empty); return what else is
    there, left untouched: a journal directory is cleared for a fresh run, never wiped whatever it holds."""
    root = Path(journal_dir)
    if not root.is_dir():
        return []
    others = []
    for p in sorted(root.iterdir()):
        if is_journal_file(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
        else:
            others.append(p)
    if not others:
        root.rmdir()
    return others


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SegmentInfo:
    """Where a segment is and which record seqs it holds (first/last None while empty)."""

    index: int
    path: Path
    first_seq: int | None = None
    last_seq: int | None = None
    size: int = 0
    prompt_ids: list[str] = field(default_factory=list)  # kept when the segment is deleted (exactly-once)
    seqs: list[int] = field(default_factory=list)  # the seq of each of prompt_ids


@dataclass
class Record:
    seq: int
    payload: memoryview  # the encoded group (after the seq)
    path: Path
    offset: int
    segment: SegmentInfo


@dataclass
class JournalScan:
    """Everything a recovery needs from the files on disk."""

    journal_id: bytes | None
    segments: list[SegmentInfo] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    torn_tail_bytes: int = 0


def _read_segment_header(path: Path, data: bytes) -> bytes:
    if len(data) < SEGMENT_HEADER.size:
        raise JournalFormatError(
            f"{path}: {len(data)} bytes, shorter than a segment header ({SEGMENT_HEADER.size})"
        )
    magic, version, header_size, _flags, journal_id = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise JournalFormatError(
            f"{path}: not a megatron_m2po journal segment (magic {magic!r}, expected {MAGIC!r})"
        )
    if version != FORMAT_VERSION or header_size != SEGMENT_HEADER.size:
        raise JournalFormatError(
            f"{path}: journal format version {version} (header {header_size} bytes) is not supported; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return journal_id


def _record_problem(data: bytes | memoryview, pos: int) -> tuple[str | None, int]:
    """(problem, payload_length) for the record at `pos`; problem None means it is valid."""
    if len(data) - pos < RECORD_HEADER.size:
        return f"partial record header ({len(data) - pos} of {RECORD_HEADER.size} bytes)", 0
    mark, length, crc, header_crc = RECORD_HEADER.unpack_from(data, pos)
    if mark != RECORD_MARK or zlib.crc32(data[pos : pos + 12]) != header_crc:
        return "bad record header", 0
    end = pos + RECORD_HEADER.size + length
    if end > len(data):
        return f"record of {length} bytes runs past the end of the file ({len(data)} bytes)", length
    if length < SEQ.size:
        return f"record of {length} bytes is shorter than its sequence number", length
    if zlib.crc32(data[pos + RECORD_HEADER.size : end]) != crc:
        return "payload checksum mismatch", length
    return None, length


def _valid_record_after(data: bytes, start: int) -> int | None:
    """Offset of the first valid record at or after `start`, if any (scans for the record mark)."""
    mark = struct.pack("<I", RECORD_MARK)
    pos = data.find(mark, start)
    while pos != -1:
        if _record_problem(data, pos)[0] is None:
            return pos
        pos = data.find(mark, pos + 1)
    return None


def scan_journal(journal_dir: str | os.PathLike, *, repair: bool = False) -> JournalScan:
    """Read and validate every segment; with `repair`, truncate a torn tail off the last segment."""
    segments = list_segments(journal_dir)
    scan = JournalScan(journal_id=None)
    last_seq = -1
    for i, (index, path) in enumerate(segments):
        is_last = i == len(segments) - 1
        data = path.read_bytes()
        if is_last and len(data) < SEGMENT_HEADER.size:
            # kill -9 while a fresh segment's header was being written: it holds no record.
            logger.warning(
                "journal: %s has a torn header (%d bytes) and no records; removing it", path, len(data)
            )
            scan.torn_tail_bytes += len(data)
            if repair:
                path.unlink()
            continue
        journal_id = _read_segment_header(path, data)
        if scan.journal_id is None:
            scan.journal_id = journal_id
        elif journal_id != scan.journal_id:
            raise JournalFormatError(
                f"{path}: belongs to journal {journal_id.hex()}, but earlier segments belong to "
                f"{scan.journal_id.hex()} (two journals mixed in one directory)"
            )
        info = SegmentInfo(index=index, path=path, size=len(data))
        pos = SEGMENT_HEADER.size
        view = memoryview(data)
        while pos < len(data):
            problem, length = _record_problem(data, pos)
            if problem is not None:
                if not is_last or _valid_record_after(data, pos + 1) is not None:
                    raise JournalCorruptError(path, pos, problem)
                logger.warning(
                    "journal: torn tail in %s at byte offset %d (%s); skipping %d bytes%s",
                    path,
                    pos,
                    problem,
                    len(data) - pos,
                    " and truncating the file" if repair else "",
                )
                scan.torn_tail_bytes += len(data) - pos
                if repair:
                    os.truncate(path, pos)
                info.size = pos
                break
            start = pos + RECORD_HEADER.size
            (seq,) = SEQ.unpack_from(data, start)
            if seq <= last_seq:
                raise JournalCorruptError(path, pos, f"record seq {seq} does not follow seq {last_seq}")
            last_seq = seq
            scan.records.append(Record(seq, view[start + SEQ.size : start + length], path, pos, info))
            if info.first_seq is None:
                info.first_seq = seq
            info.last_seq = seq
            pos = start + length
        scan.segments.append(info)
    return scan


class JournalWriter:
    """Appends records to the newest segment, rotating at `segment_bytes`.

    fsync policy: "always" = fdatasync before every append returns (survives power loss);
    "batch" = fdatasync at most every `fsync_interval_s` plus on `sync()` (the queue calls it
    at every commit); "never" = leave it to the OS. Every policy hands the bytes to the OS
    before `append` returns, so a killed process (kill -9) loses nothing acknowledged.
    """

    def __init__(
        self,
        journal_dir: str | os.PathLike,
        *,
        journal_id: bytes | None = None,
        fsync: str = "batch",
        fsync_interval_s: float = 1.0,
        segment_bytes: int = 64 << 20,
        segments: list[SegmentInfo] | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be >= 4096, got {segment_bytes}")
        self.dir = Path(journal_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal_id = journal_id or uuid.uuid4().bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self.segments: list[SegmentInfo] = list(segments or [])
        self.bytes_written = 0
        self._fd: int | None = None  # None after close(), or while a failed rotation waits for a retry
        self._closed = False
        self._offset = 0
        self._last_sync = time.monotonic()
        self._dirty = False
        self._open_new_segment()

    # -- files ---------------------------------------------------------------------------
    def _open_new_segment(self) -> None:
        index = self.segments[-1].index + 1 if self.segments else 0
        path = self.dir / segment_name(index)
        with naming_write_errors("journal segment creation", path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            header = SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, SEGMENT_HEADER.size, 0, self.journal_id)
            try:
                if os.write(fd, header) != len(header):
                    raise OSError(errno.ENOSPC, "short write of the segment header")
                if self.fsync != "never":
                    os.fsync(fd)
                    _fsync_dir(self.dir)
            except OSError:
                os.close(fd)  # a segment without its header holds nothing: remove it, retry next append
                path.unlink(missing_ok=True)
                raise
        self._fd = fd
        self._offset = len(header)
        self.segments.append(SegmentInfo(index=index, path=path, size=self._offset))

    def _close_fd(self, *, sync: bool) -> None:
        if self._fd is None:
            return
        try:
            if sync and self.fsync != "never" and self._dirty:
                with naming_write_errors("journal fsync", self.segments[-1].path):
                    os.fdatasync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def rotate(self) -> None:
        self._close_fd(sync=True)
        self._dirty = False
        self._open_new_segment()

    # -- writing -------------------------------------------------------------------------
    def append(self, seq: int, chunks: list[bytes], prompt_id: str = "") -> int:
        """Write one record (payload = seq + chunks); return its size in bytes.

        An OS failure (disk full, I/O error, read-only filesystem) raises `io_errors.WriteError` naming the
        segment and the errno; the segment is left as it was before the call.
        """
        if self._closed:
            raise JournalError(f"journal {self.dir} is closed")
        if self._fd is None:  # the rotation after the previous record failed: a new segment, now
            self._open_new_segment()
        seq_bytes = SEQ.pack(seq)
        crc = zlib.crc32(seq_bytes)
        length = len(seq_bytes)
        for c in chunks:
            crc = zlib.crc32(c, crc)
            length += len(c)
        head12 = struct.pack("<III", RECORD_MARK, length, crc)
        header = head12 + struct.pack("<I", zlib.crc32(head12))
        total = len(header) + length
        start = self._offset
        seg_path = self.segments[-1].path
        try:
            with naming_write_errors("journal append", seg_path):
                written = os.writev(self._fd, [header, seq_bytes, *chunks])
                if written != total:  # short write (a disk filling up): finish it, or raise its errno
                    rest = b"".join([header, seq_bytes, *chunks])[written:]
                    while rest:
                        n = os.write(self._fd, rest)
                        rest = rest[n:]
        except BaseException:
            # Never leave a half record in the middle of the journal: cut it off again.
            try:
                os.ftruncate(self._fd, start)
                os.lseek(self._fd, start, os.SEEK_SET)
            except OSError:
                logger.exception("journal: could not truncate a failed append in %s", seg_path)
            raise
        self._offset += total
        self.bytes_written += total
        self._dirty = True
        seg = self.segments[-1]
        seg.size = self._offset
        if seg.first_seq is None:
            seg.first_seq = seq
        seg.last_seq = seq
        seg.prompt_ids.append(prompt_id)
        seg.seqs.append(seq)
        if self.fsync == "always":
            self.sync()
        elif self.fsync == "batch" and time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()
        if self._offset >= self.segment_bytes:
            try:
                self.rotate()
            except OSError as e:  # this record is written; the next append retries the new segment
                logger.error("journal: opening the next segment failed (retried on the next append): %s", e)
        return total

    def sync(self) -> None:
        """Make everything appended so far durable (no-op under fsync="never")."""
        if self._fd is not None and self._dirty and self.fsync != "never":
            with naming_write_errors("journal fsync", self.segments[-1].path):
                os.fdatasync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def delete_segments_before(self, low_water: int) -> int:
        """Delete closed segments whose every record has seq < `low_water`; return bytes freed.

        Their prompt_ids (with their seqs) are first appended to the retired-ids file, so a restarted
        queue still refuses them (exactly-once acceptance outlives the data), and a recovery from a
        commit older than `low_water` can tell that it would need them.
        """
        doomed = [seg for seg in self.segments[:-1] if seg.last_seq is None or seg.last_seq < low_water]
        if not doomed:
            return 0
        lines = "".join(
            json.dumps({"id": pid, "seq": seq}) + "\n" for seg in doomed for pid, seq in zip(seg.prompt_ids, seg.seqs)
        )
        if lines:
            with open(self.dir / RETIRED_IDS_FILE, "a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                if self.fsync != "never":
                    os.fsync(f.fileno())
        for seg in doomed:
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
        self.segments = [seg for seg in self.segments if seg not in doomed]
        if self.fsync != "never":
            _fsync_dir(self.dir)
        return sum(seg.size for seg in doomed)

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.size for s in self.segments)

    def close(self) -> None:
        self._closed = True
        self._close_fd(sync=True)

    def abandon(self) -> None:
        """Drop the file handle without syncing: what a crash leaves behind (tests)."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_retired(journal_dir: str | os.PathLike, *, repair: bool = False) -> dict[str, int | None]:
    """prompt_id -> seq of the groups whose segments were deleted after consumption (seq None: written
    before seqs were recorded). A torn last line is dropped."""
    path = Path(journal_dir) / RETIRED_IDS_FILE
    if not path.exists():
        return {}
    data = path.read_bytes()
    ids, pos = {}, 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            entry = json.loads(line)
            if isinstance(entry, str):
                ids[entry] = None
            else:
                ids[entry["id"]] = int(entry["seq"])
        except (ValueError, KeyError, TypeError):
            if pos + len(line) < len(data):
                raise JournalCorruptError(path, pos, "unreadable prompt-id line") from None
            # The write that a crash cut short: its segment was not deleted yet, so nothing is lost.
            logger.warning("journal: torn last line in %s at byte offset %d; ignoring it", path, pos)
            if repair:
                os.truncate(path, pos)
        pos += len(line)
    return ids
