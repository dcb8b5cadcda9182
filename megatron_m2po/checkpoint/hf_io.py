"""Lazy reading and sharded writing of HF safetensors checkpoints (memory bounded by one tensor / one shard)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything in an HF dir that is not weights: copied verbatim between formats.
NON_WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class HFSafetensorsReader:
    """Read named tensors (or slices of them) from an HF dir without loading whole files.

    Handles a single `model.safetensors` or a sharded dir with `model.safetensors.index.json`. Errors name
    the file and the tensor.
    """

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        index = self.hf_dir / INDEX_FILE
        single = self.hf_dir / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a valid safetensors index ({err!r})") from err
            self.files = {name: self.hf_dir / file for name, file in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._open(single).keys()}
        else:
            raise FileNotFoundError(f"{self.hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
            try:
                self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.files:
            raise KeyError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        try:
            return self._open(self.files[name]).get_slice(name)
        except SafetensorError as err:
            raise ValueError(f"{self.files[name]}: cannot read tensor {name!r} ({err})") from err

    def read(self, name: str, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor, or only `rows` = (dim, start, stop) of it (reads just those bytes)."""
        view = self._slice(name)
        try:
            if rows is None:
                return view[:]
            dim, start, stop = rows
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            return view[index]
        except SafetensorError as err:
            raise ValueError(f"{self.files[name]}: tensor {name!r} is corrupt ({err})") from err

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> HFSafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_sharded_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    release_memory: Callable[[], None] | None = None,
) -> list[Path]:
    """Write (name, tensor) pairs as HF safetensors shards + index, holding at most one shard in memory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            path = out / f"shard-{len(tmp_names):05d}.tmp.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            tmp_names.append(path)
            current, current_bytes = {}, 0
            if release_memory is not None:
                release_memory()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.detach().contiguous()
        weight_map[name] = len(tmp_names)
        current_bytes += nbytes
        total_bytes += nbytes
    flush()
    if len(tmp_names) == 1:
        final = out / SINGLE_FILE
        tmp_names[0].replace(final)
        written.append(final)
        return written
    count = len(tmp_names)
    final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for tmp, final in zip(tmp_names, final_names):
        tmp.replace(out / final)
        written.append(out / final)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final_names[i] for name, i in weight_map.items()},
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return written


def copy_non_weight_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files (whichever exist)."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in NON_WEIGHT_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
