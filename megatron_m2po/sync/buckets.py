"""Group a stream of named tensors into buckets of bounded bytes (the unit a weight sync sends at once)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor | None]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive buckets of at most `bucket_bytes` (a single larger tensor gets a bucket of its own).

    Entries with tensor None (ranks that only take part in the gather) are consumed and skipped, so
    every rank drives the collective iterator to its end.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if tensor is None:
            continue
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
