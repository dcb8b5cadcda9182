"""Offline HF <-> Megatron conversion with bounded host memory.

A Megatron dist checkpoint stores *global* (unsharded) tensors, with the decoder layers stacked on a leading
axis, and reshards on load; so one process can write a checkpoint that any TP/PP loads, and read one back
layer by layer.

- HF -> Megatron: each Megatron tensor is built from lazily read safetensors and placed in a disk-backed
  scratch file (`numpy.memmap`), so the process holds one tensor of anonymous memory at a time and the
  dist-checkpoint writer streams from the page cache (reclaimable), not from the heap. MoE experts are one
  [1, 1, ...] fragment each of the [layers, experts, ...] global tensor Megatron checkpoints them as.
- Megatron -> HF: one decoder layer's dense tensors are loaded at a time (`dist_checkpointing.load` of a
  per-layer slice), then its experts one at a time, and written into size-bounded safetensors shards.
Host memory therefore does not grow with the number of experts.
"""

from __future__ import annotations

import ctypes
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from tqdm import tqdm

from megatron_m2po import platform
from megatron_m2po.checkpoint.gather import iter_hf_tensors
from megatron_m2po.checkpoint.hf_io import (
    HFSafetensorsReader,
    copy_non_weight_files,
    write_sharded_safetensors,
)
from megatron_m2po.checkpoint.megatron_ckpt import FORMAT, MARKER_FILE, MODEL_SUBDIR, is_megatron_checkpoint
from megatron_m2po.models.hf_config import MEGATRON_HF_SUBDIR, hf_config_dir, load_hf_config
from megatron_m2po.models.mapping import (
    Layout,
    WeightRule,
    architecture,
    global_rules,
    hf_names,
    layer_rules,
    num_experts,
    rule_instances,
    to_hf_tensors,
    to_megatron_shard,
)

logger = logging.getLogger(__name__)


def checkpoint_key(rule: WeightRule) -> str:
    """The dist-checkpoint key: Megatron saves layer norms under their TE names and stacks layers (no index);
    experts are stacked too, under the key both expert implementations share (`rule.checkpoint`)."""
    if rule.checkpoint:
        return rule.checkpoint
    name = rule.te_megatron or rule.megatron
    return name.replace("{layer}.", "")


def _fragment_offsets(layer: int | None, expert: int | None, hf_config) -> tuple[tuple[int, int, int], ...]:
    """The (axis, index, count) offsets of one tensor inside its stacked global tensor."""
    offsets = []
    if layer is not None:
        offsets.append((0, layer, hf_config.num_hidden_layers))
    if expert is not None:
        offsets.append((1, expert, num_experts(hf_config)))
    return tuple(offsets)


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps freed multi-MB tensors in its arenas, so without this
    the process footprint creeps up with every tensor converted even though only one is alive)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _ensure_single_process_group() -> None:
    if not torch.distributed.is_initialized():
        platform.init_distributed()


def _to_scratch(tensor: torch.Tensor, scratch: Path, name: str) -> torch.Tensor:
    """Copy into a disk-backed memmap tensor so it leaves the heap (the writer then streams it from disk)."""
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[tensor.dtype]
    mm = np.memmap(scratch / f"{name}.bin", dtype=np_dtype, mode="w+", shape=tuple(tensor.shape))
    out = torch.from_numpy(mm)
    if tensor.dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    out.copy_(tensor)
    return out


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
) -> Path:
    """Write a Megatron checkpoint dir (see megatron_ckpt.py) from an HF dir. Needs a process group (made if absent).

    `tensor_parallel`/`pipeline_parallel`/`expert_parallel` are validated against the config and recorded; the
    checkpoint itself loads at any TP/PP/EP the config allows.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_config = load_hf_config(hf_dir, tensor_parallel=tensor_parallel)
    if hf_config.num_hidden_layers % pipeline_parallel != 0:
        raise ValueError(
            f"{hf_dir / 'config.json'}: num_hidden_layers={hf_config.num_hidden_layers} is not divisible by "
            f"pipeline_parallel={pipeline_parallel}"
        )
    experts = num_experts(hf_config)
    if expert_parallel != 1 and (not experts or experts % expert_parallel):
        raise ValueError(
            f"{hf_dir / 'config.json'}: expert_parallel={expert_parallel} does not divide num_experts={experts}"
        )
    if (out / MODEL_SUBDIR).exists() and any((out / MODEL_SUBDIR).iterdir()):
        raise FileExistsError(f"{out / MODEL_SUBDIR}: already exists and is not empty")
    _ensure_single_process_group()
    layout = Layout.from_hf_config(hf_config)
    n_layers = hf_config.num_hidden_layers
    rules = [(rule, None, None) for rule in global_rules(hf_config)]
    rules += [
        (rule, layer, expert)
        for layer in range(n_layers)
        for rule in layer_rules(hf_config)
        for expert in rule_instances(rule, hf_config)
    ]
    state: dict[str, ShardedTensor] = {}
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="m2po-convert-", dir=out) as scratch,
        HFSafetensorsReader(hf_dir) as reader,
    ):
        for i, (rule, layer, expert) in enumerate(tqdm(rules, desc="hf -> megatron", unit="tensor")):
            parts = [reader.read(name) for name in hf_names(rule, layer, expert)]
            tensor = _to_scratch(to_megatron_shard(rule, layout, parts, tp_size=1), Path(scratch), str(i))
            del parts
            _release_freed_memory()
            key = checkpoint_key(rule)
            offsets = _fragment_offsets(layer, expert, hf_config)
            # one [1, (1,) ...] fragment of the layer- (and expert-) stacked global tensor
            fragment = tensor[(None,) * len(offsets)]
            name = ".".join([key, *(str(index) for _, index, _ in offsets)])
            state[name] = ShardedTensor.from_rank_offsets(key, fragment, *offsets, replica_id=0)
        (out / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": state}, str(out / MODEL_SUBDIR))
        del state
    copy_non_weight_files(hf_dir, out / MEGATRON_HF_SUBDIR)
    marker = {
        "format": FORMAT,
        "architecture": architecture(hf_config),
        "tensor_parallel": tensor_parallel,
        "pipeline_parallel": pipeline_parallel,
        "expert_parallel": expert_parallel,
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    logger.info("wrote megatron checkpoint %s", out)
    return out


def resolve_checkpoint(
    megatron_dir: str | Path, hf_config_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """(dist-checkpoint dir, dir with config.json + tokenizer) for a converter dir or a raw dist checkpoint.

    A converter dir (m2po_checkpoint.json) carries its own config; a raw `megatron.core.dist_checkpointing`
    dir (e.g. a training checkpoint's `dist/`) needs `hf_config_dir` for the config and tokenizer.
    """
    megatron_dir = Path(megatron_dir)
    if is_megatron_checkpoint(megatron_dir):
        return megatron_dir / MODEL_SUBDIR, Path(
            hf_config_dir
        ) if hf_config_dir else megatron_dir / MEGATRON_HF_SUBDIR
    if (megatron_dir / "metadata.json").exists():
        if hf_config_dir is None:
            raise ValueError(
                f"{megatron_dir}: a raw dist checkpoint has no HF config; pass the model's HF dir (--hf-config-dir)"
            )
        return megatron_dir, Path(hf_config_dir)
    raise FileNotFoundError(
        f"{megatron_dir}: neither a megatron_m2po checkpoint ({MARKER_FILE}) nor a dist checkpoint (metadata.json)"
    )


def iter_checkpoint_hf_tensors(
    megatron_dir: str | Path, hf_config_dir: str | Path | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of a Megatron checkpoint, reading one decoder layer at a time."""
    ckpt_dir, config_dir = resolve_checkpoint(megatron_dir, hf_config_dir)
    hf_config = load_hf_config(config_dir, tensor_parallel=1)
    _ensure_single_process_group()
    ckpt = str(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    layout = Layout.from_hf_config(hf_config)
    n_layers = hf_config.num_hidden_layers

    def load(
        rules: list[WeightRule], layer: int | None, expert: int | None = None
    ) -> dict[str, torch.Tensor]:
        request = {}
        offsets = _fragment_offsets(layer, expert, hf_config)
        for rule in rules:
            key = checkpoint_key(rule)
            if key not in metadata:
                raise KeyError(f"{ckpt}: tensor {key!r} missing from the checkpoint")
            meta = metadata[key]
            # a [1, (1,) ...] fragment of the stacked tensor (prepend_axis_num fails on partial loads)
            buf = torch.empty(
                (1,) * len(offsets) + tuple(meta.global_shape[len(offsets) :]), dtype=meta.dtype
            )
            request[key] = ShardedTensor.from_rank_offsets(key, buf, *offsets, replica_id=0)
        loaded = dist_checkpointing.load(request, ckpt, validate_access_integrity=False)
        # the result also carries the checkpoint's common (non-tensor) state: keep only what was asked for
        return {key: loaded[key][(0,) * len(offsets)] for key in request}

    def hf_tensors(rules: list[WeightRule], layer: int | None, expert: int | None = None):
        loaded = load(rules, layer, expert)
        for rule in rules:
            yield from zip(
                hf_names(rule, layer, expert), to_hf_tensors(rule, layout, [loaded.pop(checkpoint_key(rule))])
            )

    globals_ = global_rules(hf_config)
    yield from hf_tensors([globals_[0]], None)
    for layer in tqdm(range(n_layers), desc="megatron -> hf", unit="layer"):
        rules = list(layer_rules(hf_config))
        yield from hf_tensors([rule for rule in rules if not rule.per_expert], layer)
        expert_rules = [rule for rule in rules if rule.per_expert]
        for expert in range(num_experts(hf_config) if expert_rules else 0):
            yield from hf_tensors(expert_rules, layer, expert)
        _release_freed_memory()
    yield from hf_tensors(list(globals_[1:]), None)


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    hf_config_dir: str | Path | None = None,
) -> Path:
    """Write HF safetensors shards (+ index), config and tokenizer from a Megatron checkpoint."""
    out = Path(out_dir)
    _, config_dir = resolve_checkpoint(megatron_dir, hf_config_dir)
    write_sharded_safetensors(
        iter_checkpoint_hf_tensors(megatron_dir, hf_config_dir),
        out,
        max_shard_bytes=max_shard_bytes,
        release_memory=_release_freed_memory,
    )
    copy_non_weight_files(config_dir, out)
    logger.info("wrote HF model %s", out)
    return out


def export_hf_dir_collective(
    model, hf_config, out_dir: str | Path, *, source_dir: str | Path, max_shard_bytes: int = 2 * 1024**3
) -> Path:
    """Collective: write the live (TP/PP-sharded) model as an HF dir; global rank 0 writes.

    `source_dir` is where config.json and the tokenizer come from (the HF dir or a converter dir the run
    started from).
    """
    out = Path(out_dir)
    tensors = iter_hf_tensors(model, hf_config)
    if torch.distributed.get_rank() == 0:
        write_sharded_safetensors(
            ((name, tensor.detach().cpu()) for name, tensor in tensors),
            out,
            max_shard_bytes=max_shard_bytes,
            release_memory=_release_freed_memory,
        )
        copy_non_weight_files(hf_config_dir(source_dir), out)
    else:
        for _ in tensors:  # stay in lockstep with the gathers
            pass
    torch.distributed.barrier()
    return out
