"""Checkpoint failure cases against a real trainer (tiny model, one CPU process): hostile files, permissions,
truncation, a full disk, and falling back to an older checkpoint. Writes one JSON object of outcomes.

Args: HF_DIR WORK_DIR OUT_JSON [TMPFS_DIR]. With TMPFS_DIR (run as root, real or in a user namespace), a
2 MiB tmpfs is mounted there for the full-disk case."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megatron_m2po import platform
from megatron_m2po.config import Config

sys.path.insert(0, str(Path(__file__).parent))
from trainer_checkpoint_roundtrip import make_group  # noqa: E402
from two_users import NOBODY, as_nobody  # noqa: E402


class Payload:
    """Unpickling this creates the marker file: the code a hostile checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class IdPayload:
    """Unpickling this writes `id` (who ran it) into the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"id > {self.marker}",))


def params_hash(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(hf_dir: str, work: str, out: str, tmpfs: str | None = None) -> None:
    work_dir = Path(work)
    cfg = Config()
    cfg.model.path, cfg.data.path = hf_dir, "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 1
    cfg.train.responses_per_prompt, cfg.train.micro_batch_size, cfg.train.lr = 4, 2, 1e-3
    platform.init_distributed(1, 1, seed=0)
    import psutil

    from megatron_m2po.trainer import checkpointing as ck
    from megatron_m2po.trainer.policy import Policy
    from megatron_m2po.trainer.run_state import check_saved_state

    trainer = Policy(cfg)
    model, opt = trainer.model, trainer.optimizer
    pristine = work_dir / "pristine"
    hashes = {}
    for step, pid in ((1, "a"), (2, "bb")):
        trainer.update_collective([make_group(pid, 0)], step - 1)
        state = {"step": step, "version": step, "scheduler": {}, "data": {}, "queue": {}}
        ck.save_checkpoint_collective(pristine, step, model, opt, state, keep_last=2)
        hashes[step] = params_hash(model)
    result: dict = {"children_after_save": [" ".join(c.cmdline()) for c in psutil.Process().children(True)]}
    marker = work_dir / "MARKER"

    def attempt(name, mutate, *, newest=False, env=None):
        """Copy the pristine checkpoints, damage them with `mutate(step_2_dir)`, try to load; record the outcome."""
        root = work_dir / name
        shutil.copytree(pristine, root)
        mutate(root / "step_00000002")
        os.environ.update(env or {})
        try:
            skipped = None
            if newest:
                path, _, skipped = ck.load_newest_checkpoint_collective(root, model, opt, check_state=check_saved_state)
            else:
                path, _ = root / "step_00000002", ck.load_checkpoint_collective(root / "step_00000002", model, opt)
            result[name] = {"loaded": path.name, "hash_ok": params_hash(model) == hashes[int(path.name[5:])]}
            if skipped:
                result[name]["skipped"] = skipped
        except ck.CheckpointError as e:
            result[name] = {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - an unnamed failure is what the test looks for
            result[name] = {"error": f"UNNAMED {type(e).__name__}: {e}"}
        finally:
            for k in env or {}:
                del os.environ[k]
        result[name]["marker"] = marker.exists()

    def pickle_into(rel):
        return lambda d: torch.save(Payload(marker), d / rel)  # torch.save pickles the payload

    def raw_pickle_into(rel):
        import pickle

        return lambda d: (d / rel).write_bytes(pickle.dumps(Payload(marker)))

    def truncate(rel, keep=0.5):
        return lambda d: os.truncate(d / rel, int((d / rel).stat().st_size * keep))

    def chmod(rel, bits):
        return lambda d: os.chmod(d / rel, (d / rel).stat().st_mode | bits)

    def wrong_magic_bytes_item(d):
        """A byte item that is a valid pickle but not a torch file: torch says "Invalid magic number"."""
        from megatron_m2po.checkpoint.megatron_ckpt import read_dist_metadata

        md = read_dist_metadata(d / "dist")
        info = next(v for k, v in md.storage_data.items() if "_extra_state" in k.fqn)
        with open(d / "dist" / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(pickle.dumps(12345).ljust(info.length, b"\0"))

    def zero_bytes_item(d):
        """Overwrite a pickled byte item (an `_extra_state`) inside a shard: same size, unreadable content."""
        from megatron_m2po.checkpoint.megatron_ckpt import read_dist_metadata

        md = read_dist_metadata(d / "dist")
        info = next(v for k, v in md.storage_data.items() if "_extra_state" in k.fqn)
        with open(d / "dist" / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(b"\0" * info.length)

    attempt("rng_pickle", pickle_into("rng_rank0.pt"))
    attempt("metadata_pickle", raw_pickle_into("dist/.metadata"))
    attempt("metadata_pickle_newest", raw_pickle_into("dist/.metadata"), newest=True)
    attempt("world_writable", chmod("dist/__0_0.distcp", 0o002))
    attempt("group_writable_dir", chmod("dist", 0o020))
    attempt("world_writable_trusted", chmod("dist/__0_0.distcp", 0o002), env={"M2PO_TRUST_CHECKPOINTS": "1"})
    try:
        os.chown(pristine / "step_00000002" / "trainer_state.json", 12345, -1)
        os.chown(pristine / "step_00000002" / "trainer_state.json", os.getuid(), -1)
        attempt("other_owner", lambda d: os.chown(d / "trainer_state.json", 12345, -1))
    except OSError as e:
        result["other_owner"] = {"skipped": str(e)}

    def other_user_plants_through_symlinked_dist(d):
        """The step's dist/ becomes a link to a copy that user `nobody` owns; nobody overwrites the first byte
        item of a shard with a pickle that records who runs it."""
        from megatron_m2po.checkpoint.megatron_ckpt import read_dist_metadata

        shared = Path(
            tempfile.mkdtemp(prefix="m2po-shared-")
        )  # reachable by nobody, unlike pytest's tmp dirs
        made.append(shared)
        shared.chmod(0o755)
        shutil.move(d / "dist", shared / "dist")
        (d / "dist").symlink_to(shared / "dist")
        md = read_dist_metadata(shared / "dist")
        info = next(v for k, v in md.storage_data.items() if "_extra_state" in k.fqn)
        payload = pickle.dumps(IdPayload(marker))
        assert len(payload) <= info.length, (len(payload), info.length)
        (shared / "payload").write_bytes(payload)
        for f in (shared / "dist").iterdir():
            os.chown(f, NOBODY, NOBODY)
        as_nobody(
            f"dd if={shared / 'payload'} of={shared / 'dist' / info.relative_path} bs=1 seek={info.offset} "
            "conv=notrunc"
        )

    made: list[Path] = []
    try:
        os.chown(pristine, NOBODY, -1)
        os.chown(pristine, os.getuid(), -1)
        as_nobody("true")
        attempt("symlinked_dist_payload", other_user_plants_through_symlinked_dist, newest=True)
        result["symlinked_dist_payload"]["ran_as"] = marker.read_text().strip() if marker.exists() else None
        marker.unlink(missing_ok=True)
    except (OSError, subprocess.CalledProcessError) as e:
        result["symlinked_dist_payload"] = {"skipped": f"cannot act as a second user here: {e}"}
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
    attempt("truncated_shard", truncate("dist/__0_0.distcp"))
    attempt("truncated_rng", truncate("rng_rank0.pt"))
    attempt("corrupt_byte_item", zero_bytes_item)
    attempt("fallback_truncated_shard", truncate("dist/__0_1.distcp"), newest=True)
    attempt("fallback_corrupt_byte_item", zero_bytes_item, newest=True)
    attempt("fallback_wrong_magic_byte_item", wrong_magic_bytes_item, newest=True)
    attempt("intact_newest", lambda d: None, newest=True)

    def rewrite_state(edit):
        def mutate(d):
            state = json.loads((d / "trainer_state.json").read_text())
            (d / "trainer_state.json").write_text(edit(state))

        return mutate

    def without(key):
        return rewrite_state(lambda st: json.dumps({k: v for k, v in st.items() if k != key}))

    attempt("latest_not_utf8", lambda d: (d.parent / "latest").write_bytes(b"step_\xff\xfe\n"), newest=True)
    attempt("state_step_nan", rewrite_state(lambda st: json.dumps({**st, "step": float("nan")})), newest=True)
    attempt("state_without_step", without("step"), newest=True)
    attempt("state_without_scheduler", without("scheduler"), newest=True)

    if tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", tmpfs], check=True)
        try:
            full = Path(tmpfs) / "ckpt"
            ck.save_checkpoint_collective(full, 1, model, opt, {"step": 1}, keep_last=1)
            try:
                ck.save_checkpoint_collective(full, 2, model, opt, {"step": 2}, keep_last=1)
                result["disk_full"] = {"error": None}
            except ck.CheckpointError as e:
                result["disk_full"] = {"error": str(e)}
            except BaseException as e:  # noqa: BLE001
                result["disk_full"] = {"error": f"UNNAMED {type(e).__name__}: {e}"}
            result["disk_full"]["left"] = sorted(p.name for p in full.iterdir())
            result["disk_full"]["latest"] = (full / "latest").read_text().strip()
            path, _, _ = ck.load_newest_checkpoint_collective(full, model, opt)
            result["disk_full"]["resumed"] = path.name
        finally:
            subprocess.run(["umount", tmpfs], check=False)
    Path(out).write_text(json.dumps(result, indent=1))
    platform.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
