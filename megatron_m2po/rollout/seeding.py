"""Per-request sampling seeds: reproducible from one run seed, never shared by two requests.

A fixed seed on every request makes every group decode with the same noise, so rollouts stop
being independent draws from the behaviour policy. Each request's seed is instead a hash of
(run seed, policy version, prompt id, sample index): a rerun with the same run seed replays the
same rollouts, and no two requests of one run share noise (prompt ids carry the epoch, so a
prompt seen twice gets fresh noise). `run_seed=None` means "no seed": the engine draws its own.
"""

from __future__ import annotations

import hashlib

# 62 bits: fits a signed 64-bit integer (torch.Generator, SGLang's sampling_seed) even after vLLM seeds
# sample i of a request with seed + i.
SEED_BITS = 62


def request_seed(run_seed: int | None, version: int, prompt_id: str, index: int = 0) -> int | None:
    """The seed of one request; None when the run has no seed."""
    if run_seed is None:
        return None
    key = f"{int(run_seed)}|{int(version)}|{prompt_id}|{int(index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"m2po-seed").digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)
