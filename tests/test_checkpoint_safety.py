"""Checkpoints under attack and accident (issue 15): a hostile pickle never runs, files other users can write
are refused (with a deliberate override), truncation and corruption are named by file, a full disk is named
and leaves no `.partial`, and `--resume` falls back to the newest checkpoint that loads.

The unit tests run in this process; the `slow` ones read the report of one real trainer process
(tests/dist/checkpoint_safety.py) that runs every case against real Megatron checkpoints."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, subprocess_env


class _Payload:
    """Unpickling this creates the marker file: the code a hostile checkpoint file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rng_state_round_trips_without_pickle_and_a_payload_in_its_place_never_runs(tmp_path):
    from megatron_m2po.trainer.checkpointing import (
        CheckpointError,
        _read_rng_state,
        _rng_state,
        _set_rng_state,
    )

    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    torch.save(_rng_state(), tmp_path / "rng_rank0.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    _set_rng_state(_read_rng_state(tmp_path / "rng_rank0.pt"))  # read with weights_only=True
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]

    marker = tmp_path / "MARKER"
    torch.save(_Payload(marker), tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match=r"rng_rank0.pt: unreadable RNG state \(holds objects .*GLOBAL posix.system"):
        _read_rng_state(tmp_path / "rng_rank0.pt")
    data = (tmp_path / "rng_rank0.pt").read_bytes()
    (tmp_path / "rng_rank0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"rng_rank0.pt: unreadable RNG state"):
        _read_rng_state(tmp_path / "rng_rank0.pt")
    assert not marker.exists()


def test_dist_metadata_is_read_without_running_a_payload(tmp_path):
    from megatron_m2po.checkpoint.megatron_ckpt import read_dist_metadata

    marker = tmp_path / "MARKER"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: unreadable checkpoint metadata .*refers to posix.system"):
        read_dist_metadata(tmp_path)
    assert not marker.exists()


def test_trust_check_refuses_what_others_can_write_and_the_override_is_explicit(tmp_path, monkeypatch):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted, make_private

    ckpt = tmp_path / "checkpoints" / "step_1"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "dist" / ".metadata").write_bytes(b"x")
    check_trusted(ckpt, parents=1)
    os.chmod(tmp_path / "checkpoints", 0o777)
    with pytest.raises(UntrustedCheckpointError, match=r"checkpoints: world-writable .*M2PO_TRUST_CHECKPOINTS=1"):
        check_trusted(ckpt, parents=1)
    os.chmod(ckpt / "dist" / ".metadata", 0o664)
    make_private(tmp_path / "checkpoints")
    check_trusted(ckpt, parents=1)
    os.chmod(ckpt / "dist" / ".metadata", 0o664)
    with pytest.raises(UntrustedCheckpointError, match=r"dist/.metadata: group-writable \(mode -rw-rw-r--\)"):
        check_trusted(ckpt)
    monkeypatch.setenv("M2PO_TRUST_CHECKPOINTS", "1")
    check_trusted(ckpt)


def test_consumed_log_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path, caplog):
    from megatron_m2po.trainer.run_state import ConsumedLog

    path = tmp_path / "consumed.jsonl"
    good = [json.dumps({"step": s, "version": s, "groups": []}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "vers')
    with caplog.at_level(logging.WARNING):
        ConsumedLog(path, keep_through_step=2)
    assert path.read_text().splitlines() == good[:2]
    assert "consumed.jsonl: dropping its torn last line 4" in caplog.text
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"consumed.jsonl: line 2 is not a consumed-log record"):
        ConsumedLog(path, keep_through_step=2)


def _namespace_prefix() -> list[str] | None:
    """How to run the driver as root so it can mount a small tmpfs: directly as root, else in a user
    namespace (`unshare -rm`); None where neither works."""
    if os.geteuid() == 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rm"]
    return None


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("ckpt_safety")
    model = make_tiny_model("qwen3", root / "tiny")
    (root / "work").mkdir()
    prefix = _namespace_prefix()
    args = [str(model), str(root / "work"), str(root / "out.json")]
    if prefix is not None:
        (root / "mnt").mkdir()
        args.append(str(root / "mnt"))
    cmd = [*(prefix or []), sys.executable, str(REPO / "tests" / "dist" / "checkpoint_safety.py"), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((root / "out.json").read_text())


@pytest.mark.slow
def test_a_pickle_payload_in_a_checkpoint_never_runs(outcomes):
    rng, metadata = outcomes["rng_pickle"], outcomes["metadata_pickle"]
    assert "rng_pickle/step_00000002/rng_rank0.pt: unreadable RNG state" in rng["error"]
    assert "metadata_pickle/step_00000002/dist/.metadata: unreadable checkpoint metadata" in metadata["error"]
    assert "refers to posix.system" in metadata["error"]
    assert outcomes["metadata_pickle_newest"]["loaded"] == "step_00000001"  # skipped, the older one loads
    assert not any(o.get("marker") for o in outcomes.values() if isinstance(o, dict)), "the payload ran"


@pytest.mark.slow
def test_checkpoints_other_users_can_write_are_refused_unless_trusted_deliberately(outcomes):
    assert "dist/__0_0.distcp: world-writable (mode -rw-r--rw-)" in outcomes["world_writable"]["error"]
    assert "step_00000002/dist: group-writable" in outcomes["group_writable_dir"]["error"]
    for case in ("world_writable", "group_writable_dir"):
        assert "M2PO_TRUST_CHECKPOINTS=1" in outcomes[case]["error"]
    assert outcomes["world_writable_trusted"] == {"loaded": "step_00000002", "hash_ok": True, "marker": False}
    other = outcomes["other_owner"]
    if "skipped" in other:
        pytest.skip(f"cannot chown here: {other['skipped']}")
    assert "trainer_state.json: owned by uid 12345" in other["error"]


@pytest.mark.slow
def test_truncated_and_corrupt_files_are_named(outcomes):
    assert "dist/__0_0.distcp: truncated (371393 bytes, its metadata needs 742786)" in (
        outcomes["truncated_shard"]["error"]
    ) or "dist/__0_0.distcp: truncated (" in outcomes["truncated_shard"]["error"]
    assert "truncated_rng/step_00000002/rng_rank0.pt: unreadable RNG state" in outcomes["truncated_rng"]["error"]
    # torch's CheckpointException (a BaseException) becomes a CheckpointError naming the dir and the cause
    corrupt = outcomes["corrupt_byte_item"]["error"]
    assert "corrupt_byte_item/step_00000002/dist: cannot load" in corrupt and "rank 0: UnpicklingError" in corrupt
    assert "Traceback" not in corrupt


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(outcomes):
    for case in ("fallback_truncated_shard", "fallback_corrupt_byte_item"):
        assert outcomes[case] == {"loaded": "step_00000001", "hash_ok": True, "marker": False}, case
    assert outcomes["intact_newest"]["loaded"] == "step_00000002"


@pytest.mark.slow
def test_saving_leaves_no_writer_process_behind(outcomes):
    assert outcomes["children_after_save"] == []


@pytest.mark.slow
def test_a_full_disk_during_save_is_named_and_leaves_the_last_checkpoint(outcomes):
    if "disk_full" not in outcomes:
        pytest.skip("no way to mount a small tmpfs here (not root, no user namespaces)")
    full = outcomes["disk_full"]
    assert "ckpt/step_00000002.partial: saving the checkpoint failed ([Errno 28 ENOSPC]" in full["error"]
    assert "its partial files were removed" in full["error"]
    assert full["left"] == ["latest", "step_00000001"] and full["latest"] == "step_00000001"
    assert full["resumed"] == "step_00000001"
