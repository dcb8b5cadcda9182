"""Builders of realistic `Group`s for the replay-queue tests and benchmark."""

from __future__ import annotations

import random
import zlib

import numpy as np

from megatron_m2po.types import Group, Sample


def make_group(
    prompt_id: str,
    version: int | list[int] = 0,
    *,
    n_samples: int = 2,
    prompt_len: int = 5,
    response_len: int = 7,
    seed: int | None = None,
) -> Group:
    """A scored group whose tokens all come from `version` (or one list of per-token versions per sample).

    Log-probs are float32-representable, as engines that sample in fp32 return them.
    """
    rng = random.Random(seed if seed is not None else zlib.crc32(prompt_id.encode()))
    prompt = [rng.randrange(150_000) for _ in range(prompt_len)]
    samples = []
    for i in range(n_samples):
        versions = [version] * response_len if isinstance(version, int) else list(version)
        n = len(versions)
        logprobs = np.float32(np.array([-rng.random() * 8 for _ in range(n)])).astype(float).tolist()
        samples.append(
            Sample(
                prompt_id=prompt_id,
                group_index=i,
                prompt_ids=list(prompt),
                response_ids=[rng.randrange(150_000) for _ in range(n)],
                behavior_logprobs=logprobs,
                versions=versions,
                finish_reason="stop",
                engine_id="e0",
                timings={"latency_s": 0.5},
                response_text="x" * 3,
                reward=float(i % 2),
            )
        )
    return Group(prompt_id=prompt_id, prompt_ids=prompt, samples=samples, answer="42", metadata={"k": 1})
