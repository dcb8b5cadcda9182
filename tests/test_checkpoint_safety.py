"""Checkpoints under attack and accident: a hostile pickle never runs, files other users can write
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
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, subprocess_env
from tests.dist.two_users import NOBODY, as_nobody


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
    with pytest.raises(
        CheckpointError, match=r"rng_rank0.pt: unreadable RNG state \(holds objects .*GLOBAL posix.system"
    ):
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
    with pytest.raises(
        ValueError, match=r"\.metadata: unreadable checkpoint metadata .*refers to posix.system"
    ):
        read_dist_metadata(tmp_path)
    assert not marker.exists()


def test_trust_check_refuses_what_others_can_write_and_the_override_is_explicit(tmp_path, monkeypatch):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted, make_private

    ckpt = tmp_path / "checkpoints" / "step_1"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "dist" / ".metadata").write_bytes(b"x")
    check_trusted(ckpt)
    os.chmod(tmp_path / "checkpoints", 0o777)
    with pytest.raises(
        UntrustedCheckpointError, match=r"checkpoints: world-writable .*M2PO_TRUST_CHECKPOINTS=1"
    ):
        check_trusted(ckpt)
    os.chmod(ckpt / "dist" / ".metadata", 0o664)
    make_private(tmp_path / "checkpoints")
    check_trusted(ckpt)
    os.chmod(ckpt / "dist" / ".metadata", 0o664)
    with pytest.raises(UntrustedCheckpointError, match=r"dist/.metadata: group-writable \(mode -rw-rw-r--\)"):
        check_trusted(ckpt)
    monkeypatch.setenv("M2PO_TRUST_CHECKPOINTS", "1")
    check_trusted(ckpt)


@pytest.fixture
def two_users(tmp_path, request):
    """A trusted checkpoint `run/checkpoints/step_1` (ours) and `shared/`, a directory that user `nobody`
    owns and writes, the way a checkpoint on a shared disk or in another user's home would be."""
    if os.geteuid() != 0:
        pytest.skip("acting as a second user needs root here")
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    (ckpt / "dist").mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp"):
        (ckpt / "dist" / name).write_bytes(b"ours")
    reachable = Path(tempfile.mkdtemp(prefix="m2po-two-users-"))  # pytest's tmp dirs are closed to others
    request.addfinalizer(lambda: shutil.rmtree(reachable))
    reachable.chmod(0o755)
    shared = reachable / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY, NOBODY)
    as_nobody(
        f"cd {shared} && mkdir dist && printf theirs > dist/.metadata && printf theirs > dist/__0_0.distcp"
    )
    assert (shared / "dist" / "__0_0.distcp").stat().st_uid == NOBODY
    return ckpt, shared


def test_trust_check_follows_a_symlinked_directory_and_refuses_one_leaving_the_checkpoint(
    two_users, tmp_path
):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted

    ckpt, shared = two_users
    check_trusted(ckpt)
    # the files another user wrote, reached through a link that `Path.rglob` does not descend into
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(shared / "dist", outside / "dist", copy_function=shutil.copy)
    os.chown(outside / "dist" / "__0_0.distcp", NOBODY, NOBODY)
    shutil.rmtree(ckpt / "dist")
    (ckpt / "dist").symlink_to(outside / "dist")
    with pytest.raises(
        UntrustedCheckpointError, match=r"step_1/dist: a symbolic link to .*outside/dist, outside"
    ):
        check_trusted(ckpt)
    (ckpt / "dist").unlink()
    (ckpt / "dist").symlink_to(shared / "dist")
    with pytest.raises(
        UntrustedCheckpointError, match=r"step_1/dist: a symbolic link to .*shared/dist, outside"
    ):
        check_trusted(ckpt)
    # a link inside the checkpoint is followed: what it reaches is checked like any file
    (ckpt / "dist").unlink()
    shutil.copytree(shared / "dist", ckpt / ".dist", copy_function=shutil.copy)
    (ckpt / "dist").symlink_to(".dist")
    check_trusted(ckpt)
    os.chown(ckpt / ".dist" / "__0_0.distcp", NOBODY, NOBODY)
    with pytest.raises(UntrustedCheckpointError, match=r"step_1/.dist/__0_0.distcp: owned by uid 65534"):
        check_trusted(ckpt)


def test_trust_check_refuses_a_symlinked_file_leaving_the_checkpoint_or_written_by_another_user(
    two_users, tmp_path
):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted

    ckpt, shared = two_users
    shard = ckpt / "dist" / "__0_0.distcp"
    ours_outside = tmp_path / "ours.distcp"
    ours_outside.write_bytes(b"ours")
    shard.unlink()
    shard.symlink_to(ours_outside)  # no other user can write it, yet it is not part of the checkpoint
    with pytest.raises(
        UntrustedCheckpointError, match=r"__0_0.distcp: a symbolic link to .*ours.distcp, outside"
    ):
        check_trusted(ckpt)
    shard.unlink()
    shard.symlink_to(shared / "dist" / "__0_0.distcp")
    with pytest.raises(
        UntrustedCheckpointError, match=r"dist/__0_0.distcp: a symbolic link to .*shared/dist/__0_0"
    ):
        check_trusted(ckpt)
    shard.unlink()
    (ckpt / "dist" / "copy").write_bytes(b"ours")
    shard.symlink_to("copy")
    check_trusted(ckpt)


def test_trust_check_sees_through_hard_links(two_users):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted

    ckpt, shared = two_users
    shard = ckpt / "dist" / "__0_0.distcp"
    shard.unlink()
    os.link(shared / "dist" / "__0_0.distcp", shard)  # another name for the file the other user writes
    with pytest.raises(UntrustedCheckpointError, match=r"dist/__0_0.distcp: owned by uid 65534"):
        check_trusted(ckpt)
    shard.unlink()
    os.link(ckpt / "dist" / ".metadata", shard)  # a second name for one of our own files: nothing to fear
    check_trusted(ckpt)


def test_trust_check_covers_the_directories_up_to_the_run_dir_and_refuses_special_files(tmp_path):
    from megatron_m2po.checkpoint.megatron_ckpt import UntrustedCheckpointError, check_trusted

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_1"
    (ckpt / "dist").mkdir(parents=True)
    (ckpt / "dist" / ".metadata").write_bytes(b"x")
    check_trusted(ckpt, root=run)
    os.chmod(run, 0o775)  # a group member could rename checkpoints/ away and put their own in its place
    with pytest.raises(UntrustedCheckpointError, match=r"run: group-writable \(mode drwxrwxr-x\)"):
        check_trusted(ckpt, root=run)
    check_trusted(ckpt)  # by default only the checkpoint's own parent directory is checked
    os.chmod(run, 0o755)
    os.mkfifo(ckpt / "dist" / "__0_0.distcp", 0o600)  # reading it would block the load forever
    with pytest.raises(
        UntrustedCheckpointError, match=r"__0_0.distcp: not a regular file \(mode prw-------\)"
    ):
        check_trusted(ckpt, root=run)


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
    if (
        shutil.which("unshare")
        and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    ):
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
    assert (
        "dist/__0_0.distcp: truncated (371393 bytes, its metadata needs 742786)"
        in (outcomes["truncated_shard"]["error"])
        or "dist/__0_0.distcp: truncated (" in outcomes["truncated_shard"]["error"]
    )
    assert (
        "truncated_rng/step_00000002/rng_rank0.pt: unreadable RNG state" in outcomes["truncated_rng"]["error"]
    )
    # torch's CheckpointException (a BaseException) becomes a CheckpointError naming the dir and the cause
    corrupt = outcomes["corrupt_byte_item"]["error"]
    assert (
        "corrupt_byte_item/step_00000002/dist: cannot load" in corrupt
        and "rank 0: UnpicklingError" in corrupt
    )
    assert "Traceback" not in corrupt


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(outcomes):
    for case in ("fallback_truncated_shard", "fallback_corrupt_byte_item"):
        outcome = {k: v for k, v in outcomes[case].items() if k != "skipped"}
        assert outcome == {"loaded": "step_00000001", "hash_ok": True, "marker": False}, case
    assert outcomes["intact_newest"]["loaded"] == "step_00000002"


@pytest.mark.slow
def test_a_payload_another_user_plants_through_a_symlinked_dist_never_runs(outcomes):
    case = outcomes["symlinked_dist_payload"]
    if "skipped" in case and isinstance(case["skipped"], str):
        pytest.skip(case["skipped"])
    assert case["ran_as"] is None and not case["marker"], f"the payload ran as {case['ran_as']}"
    assert case["loaded"] == "step_00000001" and case["hash_ok"]
    assert "step_00000002/dist: a symbolic link to /tmp/m2po-shared-" in case["skipped"][0]
    assert "outside the checkpoint" in case["skipped"][0]


@pytest.mark.slow
def test_damaged_latest_and_trainer_state_fall_back_by_name(outcomes):
    assert outcomes["latest_not_utf8"]["loaded"] == "step_00000002"  # `latest` ignored, the newest loads
    for case, why in (
        ("state_step_nan", r"trainer_state.json: corrupt JSON \(NaN where a number belongs"),
        ("state_without_step", r"trainer_state.json: corrupt \('step' is None, not a step count\)"),
        (
            "state_without_scheduler",
            r"trainer_state.json: corrupt \('scheduler': missing, expected an object\)",
        ),
    ):
        outcome = outcomes[case]
        assert outcome["loaded"] == "step_00000001" and outcome["hash_ok"], case
        assert re.search(r"^step_00000002: .*step_00000002/" + why, outcome["skipped"][0]), outcome


@pytest.mark.slow
def test_a_shard_that_fails_to_load_is_named_with_the_checkpoint_it_skips(outcomes):
    for case, why in (
        ("fallback_corrupt_byte_item", "UnpicklingError: invalid load key"),
        ("fallback_wrong_magic_byte_item", "RuntimeError: Invalid magic number; corrupt file?"),
    ):
        outcome = outcomes[case]
        assert outcome["loaded"] == "step_00000001" and outcome["hash_ok"] and len(outcome["skipped"]) == 1
        assert outcome["skipped"][0].startswith("step_00000002: ")
        assert (
            f"step_00000002/dist: cannot load the model/optimizer checkpoint (rank 0: {why}"
            in (outcome["skipped"][0])
        )


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
