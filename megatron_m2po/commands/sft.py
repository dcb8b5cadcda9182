"""Supervised warm start of an HF model on (prompt, response) pairs: the CPU demo's first stage.

RL from a random model never sees a reward, so the demo first imitates correct answers for a short
while and stops at *partial* accuracy, measured greedily on a validation split (never on the held-out
set the demo reports). Plain PyTorch on the `transformers` model: this is a few hundred steps of
cross-entropy on a sub-million-parameter model, not a job for the Megatron trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_m2po.rollout.rewards import math_reward

logger = logging.getLogger(__name__)


@dataclass
class WarmStartResult:
    steps: int
    validation_accuracy: float
    seconds: float
    history: list[tuple[int, float]]  # (step, validation accuracy) at every check


def response_ids(tokenizer, text: str, end_token: str = "<|im_end|>") -> list[int]:
    """Token ids of a response the way the policy should write it: the text, then the end-of-turn token."""
    end = tokenizer.convert_tokens_to_ids(end_token)
    if not isinstance(end, int) or end == tokenizer.unk_token_id:
        end = tokenizer.eos_token_id
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [end]


def _batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and a mask selecting the positions whose next token is a response token."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), length - 1)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return ids, mask


@torch.no_grad()
def greedy_continuations(
    model,
    contexts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 256,
) -> list[list[int]]:
    """The greedy continuation of each context (token ids, cut after the first stop id).

    Batched `generate` with left padding: fast enough to check every few dozen warm-start steps.
    """
    was_training = model.training
    model.eval()
    continuations: list[list[int]] = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        length = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, length - len(c) :] = torch.tensor(list(c))
            attention[i, length - len(c) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=attention,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
        )
        for row in out[:, length:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
            continuations.append(row[:end])
    model.train(was_training)
    return continuations


def greedy_accuracy(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 256,
) -> float:
    """Fraction of `prompts` (items with `prompt_ids` and `answer`) answered correctly by greedy decoding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    continuations = greedy_continuations(
        model,
        [p.prompt_ids for p in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
    correct = sum(math_reward(t, p.answer) >= 1.0 for t, p in zip(texts, prompts))
    return correct / max(1, len(prompts))


def warm_start(
    model,
    train_pairs: Sequence[tuple[list[int], list[int]]],
    validate,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    max_steps: int = 1500,
    target_accuracy: float = 0.3,
    check_every: int = 50,
    pad_id: int = 0,
    seed: int = 0,
    on_step: Callable[[int, float, float | None], None] | None = None,
    mean_per_pair: bool = False,
) -> WarmStartResult:
    """AdamW cross-entropy on response tokens until `validate(model) >= target_accuracy` or `max_steps`.

    The loss is the mean over the batch's response tokens, or with `mean_per_pair` the mean over pairs of
    each pair's token mean, so a short response (the tool demo's answer after the tool's reply) weighs as
    much as a long one (its tool call).

    `validate` is called every `check_every` steps; stopping at the first check that reaches the target
    is what leaves the model at partial accuracy, with room for RL to improve it. `on_step(step, loss,
    validation accuracy or None)` after every step (the demo's progress bar).
    """
    if not train_pairs:
        raise ValueError("warm_start: no training pairs")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    history: list[tuple[int, float]] = []
    accuracy, step = 0.0, 0
    while step < max_steps:
        picks = torch.randint(len(train_pairs), (batch_size,), generator=generator).tolist()
        ids, mask = _batch([train_pairs[i] for i in picks], pad_id)
        if mean_per_pair:
            mask = mask / mask.sum(dim=1, keepdim=True) * (mask.sum() / len(picks))
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        checked = step % check_every == 0 or step == max_steps
        if checked:
            accuracy = validate(model)
            history.append((step, accuracy))
            logger.debug(
                "warm start step %d: loss %.3f, validation accuracy %.3f", step, loss.item(), accuracy
            )
        if on_step is not None:
            on_step(step, loss.item(), accuracy if checked else None)
        if checked and accuracy >= target_accuracy:
            break
    model.eval()
    return WarmStartResult(step, accuracy, time.perf_counter() - start, history)


def save_hf(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
