"""Overlong handling (DAPO, arXiv 2503.14476): a response cut at `rollout.max_new_tokens` says nothing about
whether its reasoning was right, so its reward is noise. Two optional remedies, on the consumed batch:

* overlong filtering: the truncated responses (finish reason "length") are left out of the loss and its
  token count (their rewards still shape their group's advantage baseline);
* soft overlong punishment (DAPO eq. 13), added to the task reward before the advantages, with
  L_max = max_new_tokens and L_cache = the buffer:
  R_length(y) = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max;
  -1 if |y| > L_max.
"""

from __future__ import annotations

import torch


def soft_overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """R_length of responses of `lengths` tokens (DAPO eq. 13): 0 up to L_max - L_cache, then falling linearly
    to -1 at L_max, and -1 beyond (L_max = max_new_tokens, L_cache = buffer, 0 < buffer <= max_new_tokens)."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(
            f"soft_overlong_penalty: buffer must be in (0, max_new_tokens={max_new_tokens}], got {buffer}"
        )
    lengths = lengths.to(torch.float64)
    expected = max_new_tokens - buffer
    ramp = (expected - lengths) / buffer
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_new_tokens, ramp, -1.0))
