"""Binary encoding of a `Group` for the journal.

Why not JSON or pickle: a realistic group (8 responses x 2k tokens) carries ~50k numbers;
JSON floats are slow and large, pickle is unsafe to load and Python-version dependent.
The scalar fields go into a small msgpack header; the token ids, log-probs and versions go
into a packed little-endian body (int32/float32 when exact, wider otherwise), which
`struct` converts from Python lists at C speed. A response whose tokens all come from one
policy version (the common case) stores its versions as one number. An MoE sample's routed experts go in
as uint8 (up to 256 experts) or uint16 arrays: one or two bytes per token, layer and choice. A multi-turn
sample's loss mask goes into the header as run lengths (its turns alternate: a few runs, whatever the
length), with its turn starts; a single-turn sample stores neither.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from megatron_m2po.types import Group, Sample

# dtype codes -> struct letters; all little-endian.
_INT_CODES = {"i4": "i", "i8": "q"}
_FLOAT_CODES = {"f4": "f", "f8": "d"}
_ITEM_SIZE = {"i4": 4, "i8": 8, "f4": 4, "f8": 8}
LOGPROB_DTYPES = ("float32", "float64")
_EXPERT_DTYPES = {"u1": np.uint8, "u2": np.uint16}


class CodecError(ValueError):
    """A group cannot be encoded, or a journal payload cannot be decoded."""


@dataclass(frozen=True)
class VersionRange:
    """Oldest and newest policy version of any response token of a group."""

    low: int
    high: int


def _sample_version_range(versions: list[int]) -> tuple[int, int] | None:
    if not versions:
        return None
    first = versions[0]
    if versions.count(first) == len(versions):  # C-speed fast path: one version for the whole response
        return first, first
    return min(versions), max(versions)


def version_range(group: Group) -> VersionRange:
    """The versions staleness is measured against; empty responses carry no version and are ignored."""
    return _group_version_range(
        group, [r for s in group.samples if (r := _sample_version_range(s.versions)) is not None]
    )


def _group_version_range(group: Group, ranges: list[tuple[int, int]]) -> VersionRange:
    """The group's range from its non-empty samples' (low, high) ranges."""
    if not ranges:
        raise CodecError(
            f"group {group.prompt_id!r}: no sample has a response token, so it has no policy version "
            "(the queue measures staleness from Sample.versions)"
        )
    return VersionRange(min(r[0] for r in ranges), max(r[1] for r in ranges))


def _pack_ints(values: list[int]) -> tuple[str, bytes]:
    n = len(values)
    try:
        return "i4", struct.pack(f"<{n}i", *values)
    except struct.error:  # an id or version beyond int32
        return "i8", struct.pack(f"<{n}q", *values)


def _pack_floats(values: list[float], dtype: str) -> tuple[str, bytes]:
    n = len(values)
    if dtype == "float32":
        try:
            return "f4", struct.pack(f"<{n}f", *values)
        except (struct.error, OverflowError):  # beyond float32 range: keep it exact instead
            pass
    return "f8", struct.pack(f"<{n}d", *values)


def _pack_routing(s: Sample) -> tuple[list | None, bytes]:
    """[dtype code, layers, top_k] and the bytes of a sample's routed experts (None: the sample has none)."""
    routed = s.routed_experts
    if routed is None:
        return None, b""
    if routed.size and (routed.min() < 0 or routed.max() > np.iinfo(np.uint16).max):
        raise CodecError(f"sample {s.prompt_id}#{s.group_index}: routed expert ids outside [0, 65535]")
    code = "u1" if not routed.size or routed.max() <= np.iinfo(np.uint8).max else "u2"
    packed = np.ascontiguousarray(routed, dtype=np.dtype(_EXPERT_DTYPES[code]).newbyteorder("<"))
    return [code, routed.shape[1], routed.shape[2]], packed.tobytes()


def mask_runs(mask: list[int]) -> list[int]:
    """Lengths of the alternating runs of 1s and 0s of `mask`, starting with a run of 1s (maybe empty)."""
    runs, value, length = [], 1, 0
    for m in mask:
        if m == value:
            length += 1
        else:
            runs.append(length)
            value, length = m, 1
    runs.append(length)
    return runs


def mask_from_runs(runs: list[int]) -> list[int]:
    """Inverse of `mask_runs`."""
    mask: list[int] = []
    for i, length in enumerate(runs):
        if not isinstance(length, int) or length < 0:
            raise CodecError(f"loss-mask run lengths must be non-negative integers, got {runs[:8]}")
        mask += [1 - i % 2] * length
    return mask


def encode_group(group: Group, *, logprob_dtype: str = "float32") -> tuple[list[bytes], VersionRange]:
    """Encode `group` as a list of byte chunks (header first) to write with one `writev`.

    `logprob_dtype="float32"` is lossless for engines that sample in fp32 (all of ours);
    "float64" keeps any Python float bit-exact.
    """
    if logprob_dtype not in LOGPROB_DTYPES:
        raise CodecError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    if not isinstance(group.prompt_id, str) or not group.prompt_id:
        raise CodecError(f"group prompt_id must be a non-empty string, got {group.prompt_id!r}")
    if not group.samples:
        raise CodecError(f"group {group.prompt_id!r} has no samples")
    body: list[bytes] = []
    code, blob = _pack_ints(group.prompt_ids)
    body.append(blob)
    samples_meta = []
    ranges: list[tuple[int, int]] = []
    for s in group.samples:
        meta: dict[str, Any] = {
            "group_index": s.group_index,
            "finish_reason": s.finish_reason,
            "engine_id": s.engine_id,
            "timings": s.timings,
            "response_text": s.response_text,
            "reward": s.reward,
            "n": len(s.response_ids),
        }
        if s.prompt_ids is group.prompt_ids or s.prompt_ids == group.prompt_ids:
            meta["prompt"] = None  # the usual case: same prompt as the group, stored once
        else:
            pcode, pblob = _pack_ints(s.prompt_ids)
            meta["prompt"] = [pcode, len(s.prompt_ids)]
            body.append(pblob)
        meta["ids"], blob = _pack_ints(s.response_ids)
        body.append(blob)
        meta["logprobs"], blob = _pack_floats(s.behavior_logprobs, logprob_dtype)
        body.append(blob)
        vr = _sample_version_range(s.versions)
        if vr is None:
            meta["versions"] = None
        else:
            if vr[0] == vr[1]:
                meta["versions"] = ["const", vr[0]]
            else:
                vcode, blob = _pack_ints(s.versions)
                meta["versions"] = [vcode]
                body.append(blob)
            ranges.append(vr)
        meta["routed"], blob = _pack_routing(s)
        if blob:
            body.append(blob)
        if s.loss_mask is not None:
            meta["mask"] = mask_runs(s.loss_mask)
        if s.turn_starts:
            meta["turns"] = list(s.turn_starts)
        samples_meta.append(meta)
    group_range = _group_version_range(group, ranges)
    header = {
        "prompt_id": group.prompt_id,
        "answer": group.answer,
        "metadata": group.metadata,
        "prompt": [code, len(group.prompt_ids)],
        "samples": samples_meta,
    }
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(
            f"group {group.prompt_id!r}: metadata/timings must be msgpack-serializable (str, numbers, "
            f"lists, dicts): {e}"
        ) from e
    return [struct.pack("<I", len(head)), head, *body], group_range


class _Reader:
    def __init__(self, buf: memoryview, offset: int) -> None:
        self.buf = buf
        self.offset = offset

    def take(self, code: str, n: int) -> list:
        letter = _INT_CODES.get(code) or _FLOAT_CODES.get(code)
        if letter is None:
            raise CodecError(f"unknown array dtype code {code!r}")
        size = _ITEM_SIZE[code] * n
        if self.offset + size > len(self.buf):
            raise CodecError(f"array of {n} x {code} runs past the end of the record")
        values = list(struct.unpack_from(f"<{n}{letter}", self.buf, self.offset))
        self.offset += size
        return values

    def take_experts(self, code: str, layers: int, top_k: int, tokens: int) -> np.ndarray:
        if code not in _EXPERT_DTYPES:
            raise CodecError(f"unknown routed-experts dtype code {code!r}")
        dtype = np.dtype(_EXPERT_DTYPES[code]).newbyteorder("<")
        size = dtype.itemsize * tokens * layers * top_k
        if self.offset + size > len(self.buf):
            raise CodecError(f"routed experts of {tokens} tokens run past the end of the record")
        values = np.frombuffer(self.buf, dtype=dtype, count=tokens * layers * top_k, offset=self.offset)
        self.offset += size
        return values.astype(_EXPERT_DTYPES[code]).reshape(tokens, layers, top_k)


def decode_group(payload: bytes | memoryview) -> Group:
    """Inverse of `encode_group` (payload = the concatenated chunks)."""
    buf = memoryview(payload)
    try:
        (head_len,) = struct.unpack_from("<I", buf, 0)
        header = msgpack.unpackb(buf[4 : 4 + head_len], raw=False, strict_map_key=False)
        reader = _Reader(buf, 4 + head_len)
        pcode, pn = header["prompt"]
        prompt_ids = reader.take(pcode, pn)
        samples = []
        for meta in header["samples"]:
            n = meta["n"]
            s_prompt = prompt_ids if meta["prompt"] is None else reader.take(*meta["prompt"])
            ids = reader.take(meta["ids"], n)
            logprobs = reader.take(meta["logprobs"], n)
            vmeta = meta["versions"]
            if vmeta is None:
                versions: list[int] = []
            elif vmeta[0] == "const":
                versions = [vmeta[1]] * n
            else:
                versions = reader.take(vmeta[0], n)
            routed = meta.get("routed")
            experts = None if routed is None else reader.take_experts(*routed, len(s_prompt) + n - 1)
            runs = meta.get("mask")
            samples.append(
                Sample(
                    prompt_id=header["prompt_id"],
                    group_index=meta["group_index"],
                    prompt_ids=list(s_prompt),
                    response_ids=ids,
                    behavior_logprobs=logprobs,
                    versions=versions,
                    finish_reason=meta["finish_reason"],
                    engine_id=meta["engine_id"],
                    timings=meta["timings"],
                    response_text=meta["response_text"],
                    reward=meta["reward"],
                    routed_experts=experts,
                    loss_mask=None if runs is None else mask_from_runs(runs),
                    turn_starts=list(meta.get("turns", [])),
                )
            )
        if reader.offset != len(buf):
            raise CodecError(f"{len(buf) - reader.offset} trailing bytes after the last array")
    except CodecError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, struct.error, msgpack.UnpackException) as e:
        raise CodecError(f"malformed group record: {type(e).__name__}: {e}") from e
    return Group(
        prompt_id=header["prompt_id"],
        prompt_ids=prompt_ids,
        samples=samples,
        answer=header["answer"],
        metadata=header["metadata"],
    )
