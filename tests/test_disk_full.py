"""Write failures and stalls: each writer names the file and the errno; a persistent failure stops
the run (no hang) while a TensorBoard failure does not; SIGTERM while waiting for data checkpoints and exits;
a producer that died is named; the last good checkpoint resumes.

ENOSPC comes from the kernel: /dev/full is put under a writer's descriptor (dup2, here or through
tests/fault_injection/sitecustomize.py in a child), or, where mounting is allowed, a real tmpfs fills up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_m2po.io_errors import WriteError
from megatron_m2po.metrics import MetricsLogger, read_scalars
from megatron_m2po.queue.journal import JournalWriter, scan_journal
from tests.conftest import REPO, subprocess_env
from tests.test_train_e2e import (
    BOUNDED_OVERRIDES,
    _reap,
    consumed,
    run_train,
    setup,  # noqa: F401 - the end-to-end recipe fixture, used through `e2e`
    train_cmd,
)

FAULTS = Path(__file__).parent / "fault_injection"
BOUNDED = BOUNDED_OVERRIDES


@contextlib.contextmanager
def full_disk_under(fd: int):
    """Every write to `fd` fails with the kernel's ENOSPC inside the block (its file is put back after)."""
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


# ------------------------------------------------------------------------------ each writer, in process


def test_journal_append_on_a_full_disk_names_segment_and_errno_and_leaves_the_segment_valid(tmp_path):
    w = JournalWriter(tmp_path / "j", fsync="always")
    w.append(0, [b"first"], "a")
    with full_disk_under(w._fd), pytest.raises(WriteError) as info:
        w.append(1, [b"x" * 100], "b")
    assert info.value.errno == errno.ENOSPC and info.value.persistent
    assert "[Errno 28] journal append failed: ENOSPC (No space left on device)" in str(info.value)
    assert str(tmp_path / "j" / "segment-00000000.m2poj") in str(info.value)
    w.append(1, [b"second"], "b")  # the disk has room again: the journal goes on where it was
    w.close()
    scan = scan_journal(tmp_path / "j")
    assert [bytes(r.payload) for r in scan.records] == [b"first", b"second"] and scan.torn_tail_bytes == 0


def test_a_failed_segment_rotation_keeps_the_record_and_is_retried_by_the_next_append(tmp_path):
    w = JournalWriter(tmp_path / "j", fsync="never", segment_bytes=4096)
    (tmp_path / "j" / "segment-00000001.m2poj").mkdir()  # the next segment's name is taken: creation fails
    w.append(0, [b"a" * 5000], "a")  # fills segment 0; the rotation after it fails, the record stands
    with pytest.raises(WriteError, match=r"journal segment creation failed: EEXIST .*segment-00000001"):
        w.append(1, [b"b"], "b")
    (tmp_path / "j" / "segment-00000001.m2poj").rmdir()
    w.append(1, [b"b"], "b")
    w.close()
    scan = scan_journal(tmp_path / "j")
    assert [(r.seq, r.path.name) for r in scan.records] == [
        (0, "segment-00000000.m2poj"),
        (1, "segment-00000001.m2poj"),
    ]


def test_producer_stops_after_bounded_write_failures_and_says_why(tmp_path):
    """The issue's 8,600 'group failed' errors in ten minutes: now it stops after `max_write_failures`."""
    from transformers import AutoTokenizer

    from megatron_m2po.data.prompts import PromptDataset
    from megatron_m2po.models.tiny import make_tiny_model
    from megatron_m2po.queue import ReplayQueue
    from megatron_m2po.rollout.engines.local import LocalEngine
    from megatron_m2po.rollout.farm import EngineFarm
    from megatron_m2po.rollout.manager import RolloutManager
    from megatron_m2po.rollout.rewards import RewardPool
    from megatron_m2po.rollout.stops import ProducerStopped
    from megatron_m2po.types import SamplingParams

    torch.set_num_threads(1)
    hf_dir = make_tiny_model("qwen3", tmp_path / "model", seed=4)
    data = tmp_path / "prompts.jsonl"
    rows = [{"problem": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    queue = ReplayQueue("bounded", max_staleness=100, capacity=2, journal_dir=tmp_path / "j")
    pool = RewardPool("tests.e2e_rewards:odd_char_fraction", workers=1, timeout=30)
    farm = EngineFarm([LocalEngine(hf_dir, engine_id="e0", seed=0)])
    dataset = PromptDataset(data, AutoTokenizer.from_pretrained(hf_dir), seed=0)
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0)
    manager = RolloutManager(
        dataset, farm, pool, queue, responses_per_prompt=2, sampling=sampling, max_write_failures=3
    )
    manager.start()
    try:
        assert len(queue.get_batch(1, timeout=300)) == 1  # it works before the disk fills
        manager.check_alive()
        with full_disk_under(queue._journal._fd):
            deadline = time.monotonic() + 300
            while True:
                queue.get_batch(1, timeout=0.1)  # drained as a trainer would, so the producer goes on
                try:
                    manager.check_alive()
                except ProducerStopped as e:
                    error = e
                    break
                assert time.monotonic() < deadline, "the producer kept failing without stopping"
        message = str(error)
        assert "stopped after 3 failed writes in a row" in message
        assert "journal append failed: ENOSPC" in message and "segment-00000000.m2poj" in message
        assert isinstance(error.__cause__, WriteError) and error.__cause__.errno == errno.ENOSPC
        failed = manager.metrics()["rollout/failed_groups"]
        time.sleep(2.0)
        assert manager.metrics()["rollout/failed_groups"] == failed, "still generating after it stopped"
    finally:
        manager.stop()
        pool.close()
        queue.close()


def test_tensorboard_failure_is_logged_once_counted_and_the_run_goes_on(tmp_path, caplog):
    log = MetricsLogger(tmp_path, total_steps=3, console="none")
    log.log(1, {"loss/value": 1.0})
    log.flush()
    (event,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    kept = event.rename(event.with_name(event.name + ".kept"))
    event.symlink_to("/dev/full")  # TensorBoard reopens its event file per write: now on a full device
    with caplog.at_level(logging.ERROR, logger="megatron_m2po.metrics"):
        log.log(2, {"loss/value": 2.0, "train/lr": 1e-6})
        log.flush()  # the buffered events reach the disk here
        log.log(3, {"loss/value": 3.0})
        log.histogram(3, "train/staleness", [1, 2])
        log.close()
    event.unlink()
    kept.rename(event)
    messages = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(messages) == 2, messages
    assert f"writing {tmp_path / 'tb'} failed ([Errno 28] No space left on device)" in messages[0]
    assert log.failures["TensorBoard"] >= 3
    assert messages[1].startswith(f"TensorBoard: {log.failures['TensorBoard']} writes")
    assert read_scalars(tmp_path)["loss/value"] == [(1, 1.0)]  # what was written before stays readable


def test_consumed_log_on_a_full_disk_names_the_file_and_errno(tmp_path):
    from megatron_m2po.trainer.run_state import ConsumedLog

    path = tmp_path / "consumed.jsonl"
    log = ConsumedLog(path, keep_through_step=0)
    log.append(1, 0, [])
    path.unlink()
    path.symlink_to("/dev/full")  # the file now sits on a device that is always full
    with pytest.raises(WriteError) as info:
        log.append(1, 1, [])
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (
        f"[Errno 28] consumed log append failed: ENOSPC (No space left on device): '{path}'"
    )


# ------------------------------------------------------------------------------- the trainer, end to end


@pytest.fixture(scope="module")
def e2e(setup):  # noqa: F811 - the imported fixture
    return setup


def fault_env(**faults: str) -> dict[str, str]:
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), env["PYTHONPATH"]])
    return {**env, **faults}


def start(recipe, run_dir, log: Path, env, *overrides, resume=False) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(recipe, run_dir, *BOUNDED, *overrides, resume=resume),
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def run_until_fault(recipe, run_dir, log: Path, trigger: Path, env, *overrides) -> tuple[int, str]:
    """Run the trainer and set off its injected fault once the step-2 checkpoint exists: (exit code, log)."""
    proc = start(recipe, run_dir, log, env, *overrides)
    try:
        wait_until(proc, log, "the step-2 checkpoint", checkpoint_at(run_dir, 2))
        trigger.touch()
    finally:
        code = exit_code(proc, log, timeout=300)
    return code, log.read_text()


def wait_until(proc, log: Path, what: str, ready, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited ({proc.returncode}) before {what}: {log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s: {log.read_text()[-4000:]}")
        time.sleep(0.2)


def checkpoint_at(run_dir: Path, step: int):
    latest = run_dir / "checkpoints" / "latest"
    return lambda: latest.exists() and latest.read_text().strip() == f"step_{step:08d}"


def exit_code(proc, log: Path, timeout: float) -> int:
    """The trainer's exit status; a trainer still running after `timeout` seconds is a hang (test fails)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the trainer hung (still running {timeout} s later): {log.read_text()[-4000:]}")
    finally:
        _reap(proc)


def assert_resumes_to_the_end(recipe, run_dir: Path, *overrides) -> None:
    """--resume from the last good checkpoint finishes the 6 steps; versions continue, no group twice."""
    run_train(recipe, run_dir, *BOUNDED, *overrides, resume=True)
    records = consumed(run_dir)
    assert {r["step"] for r in records} == set(range(1, 7))
    assert [r["version"] for r in records] == list(range(len(records)))
    ids = [pid for r in records for pid, _ in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was consumed twice"


WRITERS = {  # writer -> (its path in the run dir, a regex of what the run must say)
    # the journal's descriptor sits on /dev/full, whose fsync (a checkpoint's commit may come first) is EINVAL
    "journal": (
        "queue",
        r"the run stopped: .*\[Errno (28|22)\] journal (append|fsync) failed: "
        r"(ENOSPC \(No space left on device\)|EINVAL \(Invalid argument\)): '{run_dir}/queue/segment-",
    ),
    "consumed log": (
        "consumed.jsonl",
        r"the run stopped: \[Errno 28\] consumed log append failed: ENOSPC \(No space left on device\): "
        r"'{run_dir}/consumed\.jsonl'",
    ),
    "tensorboard": ("tb", r"TensorBoard: writing {run_dir}/tb failed \(\[Errno 28\] No space left on device"),
}


def said(writer: str, run_dir: Path, text: str) -> bool:
    return re.search(WRITERS[writer][1].format(run_dir=re.escape(str(run_dir))), text) is not None


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(WRITERS))
def test_disk_full_at_a_writer_stops_the_run_by_name_and_the_last_checkpoint_resumes(e2e, writer):
    """ENOSPC from step 3 on at one writer: the journal and the consumed log stop the run (exit 1, the path
    and errno named); TensorBoard does not (exit 0, logged once, then counted). The last checkpoint resumes.
    """
    root, recipe = e2e
    run_dir, log, trigger = root / f"full-{writer}", root / f"full-{writer}.log", root / f"full-{writer}.now"
    path = WRITERS[writer][0]
    env = fault_env(M2PO_FAULT_TRIGGER=str(trigger), M2PO_FAULT_DISK_FULL=str(run_dir / path))
    code, text = run_until_fault(recipe, run_dir, log, trigger, env)
    assert said(writer, run_dir, text), text[-4000:]
    if writer == "tensorboard":
        assert code == 0, text[-4000:]
        assert text.count("TensorBoard: writing") == 1 and text.count("were lost after it failed") == 1
        assert max(r["step"] for r in consumed(run_dir)) == 6
        return
    assert code == 1, text[-4000:]
    assert_resumes_to_the_end(recipe, run_dir)


@pytest.mark.slow
def test_disk_full_at_the_journal_in_fixed_mode_stops_the_run_by_name(e2e):
    """fixed mode generates in line, so the failed put itself ends the run (no producer thread to stop)."""
    root, recipe = e2e
    fixed = ["staleness.mode=fixed", "staleness.fixed_lag_steps=1"]
    run_dir, log, trigger = root / "full-fixed", root / "full-fixed.log", root / "full-fixed.now"
    env = fault_env(M2PO_FAULT_TRIGGER=str(trigger), M2PO_FAULT_DISK_FULL=str(run_dir / "queue"))
    code, text = run_until_fault(recipe, run_dir, log, trigger, env, *fixed)
    assert code == 1, text[-4000:]
    assert said("journal", run_dir, text), text[-4000:]
    assert_resumes_to_the_end(recipe, run_dir, *fixed)


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the injected-ENOSPC tests cover each writer)")
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_really_full_disk_stops_the_run_by_name_and_the_last_checkpoint_resumes(e2e, tmp_path):
    """The issue's scenario on a real filesystem: the run dir's tmpfs fills up after the step-2 checkpoint."""
    root, recipe = e2e
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "16m")
    try:
        run_dir, log = mount / "run", tmp_path / "real-full.log"
        proc = start(recipe, run_dir, log, fault_env())
        try:
            wait_until(proc, log, "the step-2 checkpoint", checkpoint_at(run_dir, 2))
            filler = mount / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
        finally:
            code = exit_code(proc, log, timeout=300)
        text = log.read_text()
        assert code != 0, text[-4000:]
        named = [ln for ln in text.splitlines() if "No space left on device" in ln and str(run_dir) in ln]
        assert named, f"no error names the path and ENOSPC: {text[-4000:]}"
        filler.unlink()
        assert_resumes_to_the_end(recipe, run_dir)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_sigterm_while_waiting_for_a_stalled_producer_checkpoints_and_exits(e2e):
    """The issue: SIGTERM was logged but nothing saved and the process never exited while the trainer waited.
    Here the producer stalls (its reward is held); SIGTERM must checkpoint and exit 0 within seconds."""
    root, recipe = e2e
    run_dir, log, gate = root / "stalled", root / "stalled.log", root / "stalled.gate"
    reward = ["rollout.reward_fn=tests.e2e_rewards:gated_odd_char_fraction", "rollout.reward_timeout=600"]
    proc = start(recipe, run_dir, log, fault_env(M2PO_TEST_REWARD_GATE=str(gate)), *reward)
    try:
        records = run_dir / "consumed.jsonl"
        wait_until(proc, log, "step 2", lambda: records.exists() and len(consumed(run_dir)) >= 3)
        gate.touch()  # the producer stalls: the trainer drains what is queued, then waits
        seen, still = len(consumed(run_dir)), time.monotonic()
        while time.monotonic() - still < 5:
            assert proc.poll() is None, log.read_text()[-4000:]
            if len(consumed(run_dir)) != seen:
                seen, still = len(consumed(run_dir)), time.monotonic()
            time.sleep(0.2)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = exit_code(proc, log, timeout=120)
        seconds = time.monotonic() - t
    finally:
        _reap(proc)
    assert code == 0, log.read_text()[-4000:]
    assert seconds < 60, f"took {seconds:.0f} s to exit"
    last_step = max(r["step"] for r in consumed(run_dir))
    assert last_step < 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last_step:08d}"
    gate.unlink()
    assert_resumes_to_the_end(recipe, run_dir, *reward)


@pytest.mark.slow
def test_a_producer_that_died_ends_the_wait_with_its_cause(e2e):
    root, recipe = e2e
    run_dir, log, trigger = root / "crashed", root / "crashed.log", root / "crashed.now"
    env = fault_env(M2PO_FAULT_TRIGGER=str(trigger), M2PO_FAULT_PRODUCER_CRASH="1")
    code, text = run_until_fault(recipe, run_dir, log, trigger, env)
    assert code == 1, text[-4000:]
    assert "the rollout producer crashed: RuntimeError: injected fault: the prompt source failed" in text
