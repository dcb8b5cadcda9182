"""Checkpoints under attack and accident (issue 15): a hostile pickle never runs, files other users can write
are refused (with a deliberate override), truncation and corruption are named by file, a full disk is named
and leaves no `.partial`, and `--resume` falls back to the newest checkpoint that loads.

One real trainer process (tests/dist/checkpoint_safety.py) runs every case and reports; the tests read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


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


def test_a_pickle_payload_in_a_checkpoint_never_runs(outcomes):
    rng, metadata = outcomes["rng_pickle"], outcomes["metadata_pickle"]
    assert "rng_pickle/step_00000002/rng_rank0.pt: unreadable RNG state" in rng["error"]
    assert "metadata_pickle/step_00000002/dist/.metadata: unreadable checkpoint metadata" in metadata["error"]
    assert "refers to posix.system" in metadata["error"]
    assert outcomes["metadata_pickle_newest"]["loaded"] == "step_00000001"  # skipped, the older one loads
    assert not any(o.get("marker") for o in outcomes.values() if isinstance(o, dict)), "the payload ran"


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


def test_truncated_and_corrupt_files_are_named(outcomes):
    assert "dist/__0_0.distcp: truncated (371393 bytes, its metadata needs 742786)" in (
        outcomes["truncated_shard"]["error"]
    ) or "dist/__0_0.distcp: truncated (" in outcomes["truncated_shard"]["error"]
    assert "truncated_rng/step_00000002/rng_rank0.pt: unreadable RNG state" in outcomes["truncated_rng"]["error"]
    # torch's CheckpointException (a BaseException) becomes a CheckpointError naming the dir and the cause
    corrupt = outcomes["corrupt_byte_item"]["error"]
    assert "corrupt_byte_item/step_00000002/dist: cannot load" in corrupt and "rank 0: UnpicklingError" in corrupt
    assert "Traceback" not in corrupt


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(outcomes):
    for case in ("fallback_truncated_shard", "fallback_corrupt_byte_item"):
        assert outcomes[case] == {"loaded": "step_00000001", "hash_ok": True, "marker": False}, case
    assert outcomes["intact_newest"]["loaded"] == "step_00000002"


def test_saving_leaves_no_writer_process_behind(outcomes):
    assert outcomes["children_after_save"] == []


def test_a_full_disk_during_save_is_named_and_leaves_the_last_checkpoint(outcomes):
    if "disk_full" not in outcomes:
        pytest.skip("no way to mount a small tmpfs here (not root, no user namespaces)")
    full = outcomes["disk_full"]
    assert "ckpt/step_00000002.partial: saving the checkpoint failed ([Errno 28 ENOSPC]" in full["error"]
    assert "its partial files were removed" in full["error"]
    assert full["left"] == ["latest", "step_00000001"] and full["latest"] == "step_00000001"
    assert full["resumed"] == "step_00000001"
