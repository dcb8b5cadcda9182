"""Journal records: exact round trip, torn tails, corruption in the middle, foreign files, a real kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from queue_helpers import make_group

from megatron_m2po.queue import JournalCorruptError, JournalError, JournalFormatError, ReplayQueue
from megatron_m2po.queue.codec import CodecError, decode_group, encode_group, mask_from_runs, mask_runs
from megatron_m2po.queue.journal import RECORD_HEADER, SEGMENT_HEADER, list_segments, scan_journal
from megatron_m2po.types import Group, Sample, same_routing
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- codec


@st.composite
def groups(draw, float64: bool = False):
    n_samples = draw(st.integers(1, 4))
    prompt = draw(st.lists(st.integers(0, 2**40), max_size=6))
    floats = st.floats(allow_nan=False, width=64 if float64 else 32)
    samples = []
    for i in range(n_samples):
        n = draw(st.integers(1 if i == 0 else 0, 9))
        versions = draw(st.one_of(st.just([3] * n), st.lists(st.integers(0, 2**33), min_size=n, max_size=n)))
        sample_prompt = prompt if draw(st.booleans()) else draw(st.lists(st.integers(0, 9), max_size=3))
        fed = len(sample_prompt) + n - 1
        routed = None
        if fed >= 0 and draw(st.booleans()):  # an MoE engine's routing: 8 or 512 experts, 1-2 layers, top-2
            experts, layers = draw(st.sampled_from([8, 512])), draw(st.integers(1, 2))
            flat = draw(
                st.lists(st.integers(0, experts - 1), min_size=fed * layers * 2, max_size=fed * layers * 2)
            )
            routed = np.array(flat, dtype=np.int64).reshape(fed, layers, 2)
        mask, starts = None, []
        if n and draw(st.booleans()):  # a multi-turn trajectory: its loss mask and turn starts
            mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
            starts = sorted({0, *draw(st.lists(st.integers(0, n - 1), max_size=4))})
        samples.append(
            Sample(
                prompt_id="p",
                group_index=i,
                prompt_ids=sample_prompt,
                routed_experts=routed,
                response_ids=draw(st.lists(st.integers(0, 2**31 + 5), min_size=n, max_size=n)),
                behavior_logprobs=draw(st.lists(floats, min_size=n, max_size=n)),
                versions=versions,
                finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
                engine_id=draw(st.text(max_size=4)),
                timings={"t": draw(st.floats(allow_nan=False))},
                response_text=draw(st.text(max_size=10)),
                reward=draw(st.one_of(st.none(), st.floats(allow_nan=False))),
                loss_mask=mask,
                turn_starts=starts,
            )
        )
    meta = draw(st.dictionaries(st.text(max_size=3), st.one_of(st.integers(-5, 5), st.text(max_size=3))))
    return Group(
        prompt_id="p", prompt_ids=prompt, samples=samples, answer=draw(st.text(max_size=5)), metadata=meta
    )


@settings(max_examples=60, deadline=None)
@given(group=groups())
def test_codec_round_trip_is_exact(group):
    chunks, vr = encode_group(group)
    decoded = decode_group(b"".join(chunks))
    assert decoded == group
    assert all(same_routing(a, b) for a, b in zip(decoded.samples, group.samples))
    versions = [v for s in group.samples for v in s.versions]
    assert (vr.low, vr.high) == (min(versions), max(versions))


@settings(max_examples=30, deadline=None)
@given(group=groups(float64=True))
def test_codec_float64_keeps_any_python_float(group):
    chunks, _ = encode_group(group, logprob_dtype="float64")
    assert decode_group(b"".join(chunks)) == group


def test_routed_experts_take_one_byte_per_choice_up_to_256_experts():
    prompt, response, layers = list(range(100)), list(range(1000)), 48
    fed = len(prompt) + len(response) - 1
    sample = Sample("p", 0, prompt, response, [0.0] * 1000, [1] * 1000, "stop")
    plain = sum(len(c) for c in encode_group(Group("p", prompt, [sample]))[0])
    for experts, width in ((128, 1), (256, 1), (512, 2)):
        routed = np.random.default_rng(0).integers(0, experts, size=(fed, layers, 8))
        sample.routed_experts = routed
        chunks, _ = encode_group(Group("p", prompt, [sample]))
        assert sum(len(c) for c in chunks) - plain < fed * layers * 8 * width + 32, experts
        decoded = decode_group(b"".join(chunks)).samples[0].routed_experts
        assert decoded.shape == routed.shape and (decoded == routed).all()


def test_routed_experts_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"routed_experts must be integers \[4 fed tokens"):
        Sample("p", 0, [1, 2], [3, 4, 5], [0.0] * 3, [0] * 3, "stop", routed_experts=np.zeros((5, 2, 2), int))
    with pytest.raises(ValueError, match="routed_experts must be integers"):
        Sample("p", 0, [1, 2], [3, 4, 5], [0.0] * 3, [0] * 3, "stop", routed_experts=np.zeros((4, 2, 2)))


@given(mask=st.lists(st.integers(0, 1), max_size=40))
@example(mask=[])
@example(mask=[0, 0, 1])
def test_loss_mask_runs_round_trip(mask):
    runs = mask_runs(mask)
    assert mask_from_runs(runs) == mask
    assert all(r > 0 for r in runs[1:]) and len(runs) <= len(mask) + 1


def test_a_multi_turn_sample_stores_its_mask_as_runs_and_a_single_turn_one_stores_none():
    n = 3000
    mask = [1] * 1000 + [0] * 500 + [1] * 1500
    multi = make_group("m", 1, n_samples=1, response_len=n)
    multi.samples[0].loss_mask, multi.samples[0].turn_starts = mask, [0, 1000, 1500]
    chunks, _ = encode_group(multi)
    single, _ = encode_group(make_group("m", 1, n_samples=1, response_len=n))
    assert len(b"".join(chunks)) - len(b"".join(single)) < 40  # a few run lengths, not a byte per token
    back = decode_group(b"".join(chunks)).samples[0]
    assert back.loss_mask == mask and back.turn_starts == [0, 1000, 1500] and back.model_tokens == 2500
    assert decode_group(b"".join(single)).samples[0].loss_mask is None


def test_a_sample_refuses_a_mask_or_turns_that_do_not_fit_its_response():
    base = dict(
        prompt_id="p",
        group_index=0,
        prompt_ids=[1],
        response_ids=[5, 6, 7],
        behavior_logprobs=[0.0] * 3,
        versions=[0] * 3,
        finish_reason="stop",
    )
    with pytest.raises(ValueError, match="loss_mask must hold one 0 or 1 per response token"):
        Sample(**base, loss_mask=[1, 0])
    with pytest.raises(ValueError, match="loss_mask must hold one 0 or 1"):
        Sample(**base, loss_mask=[1, 2, 1])
    with pytest.raises(ValueError, match="turn_starts must rise strictly from 0"):
        Sample(**base, turn_starts=[0, 2, 2])
    with pytest.raises(ValueError, match="turn_starts must rise strictly from 0"):
        Sample(**base, turn_starts=[0, 3])


def test_codec_is_compact_binary():
    """2k-token responses cost ~8 bytes/token (int32 id + float32 log-prob + one version number)."""
    g = make_group("big", 5, n_samples=8, prompt_len=1536, response_len=2048)
    size = sum(map(len, encode_group(g)[0]))
    assert size < 8 * 2048 * 8 + 1536 * 4 + 4096


def test_codec_rejects_group_without_version():
    g = make_group("empty", 0, response_len=0)
    with pytest.raises(CodecError, match="'empty'.*no policy version"):
        encode_group(g)
    with pytest.raises(CodecError, match="msgpack-serializable"):
        encode_group(Group("x", [1], make_group("x").samples, metadata={"bad": object()}))


# ---------------------------------------------------------------- files on disk


def _write_journal(tmp_path: Path, n: int, **kwargs) -> tuple[Path, list[Group]]:
    jdir = tmp_path / "journal"
    groups_ = [make_group(f"g{i}", 0, response_len=20) for i in range(n)]
    with ReplayQueue("bounded", capacity=64, journal_dir=jdir, fsync="never", **kwargs) as q:
        for g in groups_:
            assert q.put(g)
    return jdir, groups_


def _record_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    pos, offsets = SEGMENT_HEADER.size, []
    while pos < len(data):
        offsets.append(pos)
        _, length, _, _ = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size + length
    return offsets


def _segment(jdir: Path) -> Path:
    """The segment holding the records (a recovery starts a new, empty one after it)."""
    return list_segments(jdir)[0][1]


def test_recover_replays_everything_without_a_commit(tmp_path):
    jdir, groups_ = _write_journal(tmp_path, 5)
    q = ReplayQueue.recover(jdir, None)
    assert q.get_batch(5) == groups_
    q.close()


@pytest.mark.parametrize("cut", [3, RECORD_HEADER.size + 10, -1])
def test_torn_tail_is_skipped_with_warning_and_truncated(tmp_path, caplog, cut):
    jdir, groups_ = _write_journal(tmp_path, 5)
    seg = _segment(jdir)
    last = _record_offsets(seg)[-1]
    size = seg.stat().st_size
    os.truncate(seg, last + cut if cut > 0 else size + cut)
    with caplog.at_level(logging.WARNING):
        q = ReplayQueue.recover(jdir, None)
    assert "torn tail" in caplog.text and str(seg) in caplog.text and f"offset {last}" in caplog.text
    assert q.queued_prompt_ids() == [g.prompt_id for g in groups_[:4]]
    assert seg.stat().st_size == last  # truncated, so new records follow valid ones
    assert q.put(make_group("after", 0))
    q.close()
    assert ReplayQueue.recover(jdir, None).queued_prompt_ids()[-1] == "after"


def test_garbage_after_last_record_is_a_torn_tail(tmp_path, caplog):
    jdir, groups_ = _write_journal(tmp_path, 3)
    seg = _segment(jdir)
    with open(seg, "ab") as f:
        f.write(b"\0" * 4096)  # what a power loss can leave: a zero-filled extension
    with caplog.at_level(logging.WARNING):
        q = ReplayQueue.recover(jdir, None)
    assert "torn tail" in caplog.text
    assert len(q) == 3


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corruption_in_the_middle_names_file_and_offset(tmp_path, where):
    jdir, _ = _write_journal(tmp_path, 5)
    seg = _segment(jdir)
    offset = _record_offsets(seg)[2]
    data = bytearray(seg.read_bytes())
    data[offset + (RECORD_HEADER.size + 30 if where == "payload" else 5)] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match=f"{seg.name} at byte offset {offset}") as info:
        ReplayQueue.recover(jdir, None)
    assert info.value.offset == offset and info.value.path == seg
    assert seg.read_bytes() == bytes(data)  # nothing was truncated


def test_torn_record_in_an_older_segment_is_corruption(tmp_path):
    jdir, _ = _write_journal(tmp_path, 30, segment_bytes=4096)
    segs = [p for _, p in list_segments(jdir)]
    assert len(segs) >= 3
    first = segs[0]
    os.truncate(first, first.stat().st_size - 7)
    with pytest.raises(JournalCorruptError, match=first.name):
        ReplayQueue.recover(jdir, None)


def test_wrong_magic_or_format_version_is_a_clear_error(tmp_path):
    jdir, _ = _write_journal(tmp_path, 2)
    seg = _segment(jdir)
    data = bytearray(seg.read_bytes())
    seg.write_bytes(b"NOTAJRNL" + bytes(data[8:]))
    with pytest.raises(JournalFormatError, match=f"{seg.name}: not a megatron_m2po journal segment"):
        ReplayQueue.recover(jdir, None)
    data[8] = 99  # format version
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalFormatError, match="format version 99 .*not supported"):
        ReplayQueue.recover(jdir, None)


def test_fresh_queue_refuses_a_directory_holding_a_journal(tmp_path):
    jdir, _ = _write_journal(tmp_path, 1)
    with pytest.raises(JournalError, match="already holds a journal.*recover"):
        ReplayQueue(journal_dir=jdir)


def test_commit_from_another_journal_or_with_missing_records_is_refused(tmp_path):
    jdir, _ = _write_journal(tmp_path, 3)
    q = ReplayQueue.recover(jdir, None)
    state = q.commit()
    q.close()
    other = dict(state, journal_id="00" * 16)
    with pytest.raises(JournalFormatError, match="belongs to journal"):
        ReplayQueue.recover(jdir, other)
    seg = _segment(jdir)
    os.truncate(seg, _record_offsets(seg)[1])  # lose acknowledged records the commit still needs
    with pytest.raises(JournalError, match="2 group\\(s\\) accepted before the checkpoint .* missing"):
        ReplayQueue.recover(jdir, state)
    with pytest.raises(ValueError, match="missing key 'low_water'"):
        ReplayQueue.recover(jdir, {k: v for k, v in state.items() if k != "low_water"})


def test_segments_rotate_and_are_collected_once_consumed_and_committed(tmp_path):
    jdir = tmp_path / "j"
    q = ReplayQueue("bounded", max_staleness=100, capacity=1000, journal_dir=jdir, segment_bytes=8192)
    peak = 0
    for step in range(40):
        for i in range(4):
            assert q.put(make_group(f"s{step}-{i}", step, response_len=50))
        assert len(q.get_batch(4)) == 4
        q.publish_version(step + 1)
        state = q.commit()
        q.gc(state)  # as after each checkpoint with keep_last=1
        peak = max(peak, q.metrics()["queue/journal_bytes"])
    assert q.metrics()["queue/journal_bytes_written"] > 5 * peak  # bounded: old segments were deleted
    assert len(list_segments(jdir)) <= 2
    q.close()
    assert ReplayQueue.recover(jdir, state).queued_prompt_ids() == []


def _run_with_checkpoints(jdir, steps: int, *, keep_last: int):
    """A bounded-mode producer/trainer loop that checkpoints every step and collects the journal for the
    oldest of `keep_last` kept commits (as train.save does); returns the kept commits, oldest first, and
    the prompt ids consumed per step."""
    q = ReplayQueue("bounded", max_staleness=100, capacity=1000, journal_dir=jdir, segment_bytes=4096)
    kept, consumed = [], []
    for step in range(steps):
        for i in range(3):
            assert q.put(make_group(f"s{step}-{i}", step, response_len=60))
        consumed.append([g.prompt_id for g in q.get_batch(2)])  # one group per step stays queued
        q.publish_version(step + 1)
        kept = [*kept, q.commit()][-keep_last:]
        q.gc(kept[0])
    q.close()
    return kept, consumed


def test_gc_keeps_what_the_oldest_kept_checkpoint_needs_so_falling_back_loses_nothing(tmp_path):
    jdir = tmp_path / "j"
    (previous, newest), consumed = _run_with_checkpoints(jdir, 12, keep_last=2)
    assert len(list_segments(jdir)) < 12  # something was collected
    q = ReplayQueue.recover(jdir, previous, mode="bounded", max_staleness=100, capacity=1000)
    # Fall back one checkpoint: what step 12 consumed plus what stayed queued is replayed, nothing else.
    replayed = q.queued_prompt_ids()
    assert set(consumed[-1]) <= set(replayed)
    every = {f"s{s}-{i}" for s in range(12) for i in range(3)}
    done_before = {pid for batch in consumed[:-1] for pid in batch}
    assert set(replayed) == every - done_before
    assert q.accepted_prompt_ids() == every
    q.close()


def test_recovery_from_a_commit_older_than_the_gc_is_refused_naming_the_retired_file(tmp_path):
    jdir = tmp_path / "j"
    (newest,), _ = _run_with_checkpoints(jdir, 12, keep_last=1)
    old = ReplayQueue.recover(jdir, newest)
    old.close()
    # A commit from long before the last GC (what a fallback beyond keep_last would use)
    stale = dict(newest, low_water=0, next_seq=3, consumed_above=[], version=1)
    with pytest.raises(
        JournalError, match=r"retired-prompt-ids.jsonl retires \d+ group\(s\) this checkpoint"
    ):
        ReplayQueue.recover(jdir, stale)


def test_accepted_counts_the_groups_recovery_replays(tmp_path):
    jdir = tmp_path / "j"
    q = ReplayQueue("bounded", max_staleness=100, capacity=1000, journal_dir=jdir)
    for i in range(3):
        q.put(make_group(f"a{i}", 0))
    state = q.commit()
    for i in range(4):  # accepted after the checkpoint, then the trainer dies
        q.put(make_group(f"b{i}", 0))
    assert q.metrics()["queue/accepted"] == 7
    q._journal.abandon()
    again = ReplayQueue.recover(jdir, state)
    assert again.metrics()["queue/accepted"] == 7
    assert len(again) == 7
    again.close()


# ---------------------------------------------------------------- a real crash

_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from queue_helpers import make_group
    from megatron_m2po.queue import ReplayQueue
    q = ReplayQueue("bounded", capacity=100000, journal_dir={jdir!r}, fsync="never", segment_bytes=1 << 20)
    i = 0
    while True:
        q.put(make_group(f"k{{i}}", 0, n_samples=4, response_len=3000, seed=i))
        print(f"k{{i}}", flush=True)  # acknowledged: put returned
        i += 1
    """
)


def test_kill_9_while_writing_loses_nothing_acknowledged(tmp_path):
    jdir = tmp_path / "journal"
    code = _WRITER.format(tests=str(REPO / "tests"), jdir=str(jdir))
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = []
    try:
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 60:
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the writer is busy with the next records
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(list_segments(jdir)) > 1  # it rotated segments on the way
    scan = scan_journal(jdir)  # a read-only look: may report a torn tail, must not raise
    q = ReplayQueue.recover(jdir, None)
    recovered = q.queued_prompt_ids()
    assert recovered[: len(acknowledged)] == acknowledged
    assert (
        len(recovered) == len(scan.records) >= len(acknowledged)
    )  # plus any written but not yet acknowledged
    for i, g in enumerate(q.get_batch(len(recovered))):
        assert g == make_group(f"k{i}", 0, n_samples=4, response_len=3000, seed=i)
    q.close()


_FULL_DISK = textwrap.dedent(
    """
    import errno, resource, signal, sys
    sys.path.insert(0, {tests!r})
    from queue_helpers import make_group
    from megatron_m2po.queue import ReplayQueue
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    q = ReplayQueue("fixed", capacity=1000, journal_dir={jdir!r}, fsync="always")
    i = 0
    while True:
        assert q.admit(timeout=0)
        try:
            q.put(make_group(f"f{{i}}", 0, n_samples=2, response_len=700, seed=i))
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            assert len(q) == i and f"f{{i}}" not in q.accepted_prompt_ids()
            assert q.metrics()["queue/inflight"] == 1  # the failed put left its reservation to release
            q.release()
            print(i, flush=True)
            break
        i += 1
    """
)


def test_failed_append_leaves_no_half_record(tmp_path):
    """A real write failure (file-size limit, like a full disk) mid-record: the record is cut off again."""
    jdir = tmp_path / "journal"
    code = _FULL_DISK.format(tests=str(REPO / "tests"), jdir=str(jdir))
    env = subprocess_env(OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    accepted = int(out.stdout)
    assert accepted >= 2
    assert scan_journal(jdir).torn_tail_bytes == 0  # the file ends exactly after the last good record
    q = ReplayQueue.recover(jdir, None)
    assert q.queued_prompt_ids() == [f"f{i}" for i in range(accepted)]
    q.close()
