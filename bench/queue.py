"""Replay-queue throughput with journaling on, against writing the same bytes raw to the same disk.

    python -m bench.queue [--groups 96] [--dir /tmp] [--fsync always batch never]

Workload: realistic groups (8 responses x 2048 response tokens, a 512-token prompt, fp32
behaviour log-probs, one policy version per response), put by the producer and taken by the
trainer in batches of `groups_per_update`, with a commit (checkpoint) every 4 batches so
segments are rotated and collected as in training. Baseline, measured in the same run on
the same directory: os.write of exactly the journal's bytes per group (the records, already
encoded) with the same fsync policy. Also printed: how many times faster than a 32B
training step consumes groups (assumption: 512 responses = 64 groups per optimizer step
of ~60 s, the paper's mini-batch; i.e. ~1.07 groups/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from queue_helpers import make_group  # noqa: E402

from megatron_m2po.queue import ReplayQueue  # noqa: E402
from megatron_m2po.queue.journal import RECORD_HEADER, SEQ, list_segments, scan_journal  # noqa: E402

STEP_GROUPS, STEP_SECONDS = 64, 60.0  # a 32B optimizer step: 64 prompts x 8 responses in ~60 s


def run_queue(groups, directory: Path | None, fsync: str, batch: int) -> tuple[float, int]:
    """Seconds for put + get of every group through a journaled queue (in memory when `directory`
    is None), and the bytes it wrote."""
    jdir = None if directory is None else directory / "journal"
    q = ReplayQueue(
        "bounded",
        max_staleness=1000,
        groups_per_update=batch,
        capacity=4 * batch,
        journal_dir=jdir,
        fsync=fsync,
    )
    start = time.perf_counter()
    for i, g in enumerate(groups):
        assert q.put(g)
        if (i + 1) % batch == 0:
            assert len(q.get_batch(batch)) == batch
            q.publish_version(q.version + 1)
            if (i + 1) % (4 * batch) == 0:
                q.commit()
    q.close()
    elapsed = time.perf_counter() - start
    written = int(q.metrics()["queue/journal_bytes_written"])
    if jdir is not None:
        shutil.rmtree(jdir)
    return elapsed, written


def journal_records(groups, directory: Path) -> list[bytes]:
    """The exact bytes the journal writes per group (so the baseline writes the same)."""
    jdir = directory / "records"
    with ReplayQueue("bounded", capacity=len(groups), journal_dir=jdir, fsync="never") as q:
        for g in groups:
            q.put(g)
    files = {p: p.read_bytes() for _, p in list_segments(jdir)}
    records = [
        files[r.path][r.offset : r.offset + RECORD_HEADER.size + SEQ.size + len(r.payload)]
        for r in scan_journal(jdir).records
    ]
    shutil.rmtree(jdir)
    return records


def run_raw(records: list[bytes], directory: Path, fsync: str, batch: int, interval: float = 1.0) -> float:
    """Seconds to os.write the same bytes, with the same fsync policy (and syncs at the same commits)."""
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    last_sync = start = time.perf_counter()
    for i, rec in enumerate(records):
        os.write(fd, rec)
        if fsync == "always":
            os.fdatasync(fd)
        elif fsync == "batch":
            now = time.perf_counter()
            if now - last_sync >= interval or (i + 1) % (4 * batch) == 0:
                os.fdatasync(fd)
                last_sync = now
    if fsync != "never":
        os.fdatasync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=96, help="groups per measurement")
    parser.add_argument("--batch", type=int, default=8, help="groups consumed per version")
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating repetitions; medians are reported"
    )
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the journal and the raw file go")
    parser.add_argument("--fsync", nargs="+", default=["batch", "always", "never"])
    args = parser.parse_args()

    base = [make_group(f"t{i}", 7, n_samples=8, prompt_len=512, response_len=2048, seed=i) for i in range(8)]
    workdir = Path(tempfile.mkdtemp(prefix="m2po-bench-queue-", dir=args.dir))
    try:
        print(f"disk: {args.dir}; {args.groups} groups of 8 x 2048 tokens per run; median of {args.repeats}")
        print(
            f"{'fsync':>7} {'queue MB/s':>11} {'raw MB/s':>9} {'ratio':>6} {'groups/s':>9} {'x 32B step':>11}"
        )
        for fsync in args.fsync:
            q_times, r_times = [], []
            for rep in range(args.repeats):
                groups = [
                    dataclasses.replace(base[i % len(base)], prompt_id=f"r{rep}-g{i}")
                    for i in range(args.groups)
                ]
                records = journal_records(groups, workdir)
                elapsed, written = run_queue(groups, workdir, fsync, args.batch)
                q_times.append(elapsed)
                r_times.append(run_raw(records, workdir, fsync, args.batch))
                assert sum(map(len, records)) == written, "baseline must write the journal's bytes"
            tq, tr = statistics.median(q_times), statistics.median(r_times)
            rate = args.groups / tq
            print(
                f"{fsync:>7} {written / tq / 1e6:11.0f} {written / tr / 1e6:9.0f} {tr / tq:6.2f} "
                f"{rate:9.0f} {rate / (STEP_GROUPS / STEP_SECONDS):10.0f}x"
            )
        groups = [dataclasses.replace(base[i % len(base)], prompt_id=f"m{i}") for i in range(args.groups)]
        tm = statistics.median(run_queue(groups, None, "never", args.batch)[0] for _ in range(args.repeats))
        rate = args.groups / tm
        print(f"{'no journal (in memory)':>34} {rate:9.0f} {rate / (STEP_GROUPS / STEP_SECONDS):10.0f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
