"""The demo's supervised warm start (megatron_m2po/commands/sft.py, through demo.warm_start_model) on the real task
files and the demo's tiny Qwen3: when it checks validation accuracy, when it stops, and what it records."""

from __future__ import annotations

import pytest
import torch

from megatron_m2po.commands import demo
from megatron_m2po.commands.sft import WarmStartResult, warm_start

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    data, base = demo.prepare_task(out, heldout=20)
    return out, data, base


@pytest.mark.parametrize(
    ("target", "steps", "checked"),
    [
        (2.0, 5, [2, 4, 5]),  # unreachable: every check_every steps and at the step limit
        (0.0, 2, [2]),  # reached at the first check: it stops there (partial accuracy, room for RL)
    ],
)
def test_warm_start_checks_every_n_steps_and_stops_at_the_target(task, target, steps, checked):
    out, data, base = task
    result = demo.warm_start_model(
        base, out / f"warm{target}", data, lr=3e-3, batch_size=8, max_steps=5, target=target, check_every=2
    )
    assert result["steps"] == steps and [step for step, _ in result["history"]] == checked
    assert result["validation_accuracy"] == result["history"][-1][1]
    assert (result["lr"], result["batch_size"]) == (3e-3, 8)
    assert (out / f"warm{target}" / "config.json").is_file()


def test_warm_start_learns_the_response_tokens(task):
    """Cross-entropy on two problems' responses falls within a few steps: the loop trains on its pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_m2po.commands.sft import response_ids
    from megatron_m2po.data.prompts import PromptDataset

    _, data, base = task
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train = PromptDataset(data["train"], tokenizer, template=demo.DEMO_TEMPLATE, shuffle=False)
    pairs = [(p.prompt_ids, response_ids(tokenizer, f"\\boxed{{{p.answer}}}")) for p in (train[0], train[1])]
    losses: list[float] = []
    result = warm_start(
        model,
        pairs,
        lambda m: 0.0,
        lr=3e-3,
        batch_size=4,
        max_steps=30,
        check_every=30,
        pad_id=tokenizer.pad_token_id,
        on_step=lambda step, loss, accuracy: losses.append(loss),
    )
    assert isinstance(result, WarmStartResult) and result.steps == 30 and len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="no training pairs"):
        warm_start(model, [], lambda m: 0.0)


@pytest.mark.parametrize("mean_per_pair", [False, True])
def test_warm_start_loss_is_the_token_mean_or_the_mean_of_each_pairs_token_mean(task, mean_per_pair):
    """The first step's reported loss, recomputed with the reference model on the batch it drew: a long and a
    short response weigh by their tokens, or (mean_per_pair, the tool demo's call and answer) equally."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, base = task
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    pairs = [
        (prompt, tokenizer("1" * 40, add_special_tokens=False)["input_ids"]),
        (prompt, [tokenizer.eos_token_id]),
    ]
    losses: list[float] = []
    warm_start(
        model,
        pairs,
        lambda m: 0.0,
        batch_size=6,
        max_steps=1,
        check_every=1,
        pad_id=tokenizer.pad_token_id,
        seed=5,
        on_step=lambda step, loss, accuracy: losses.append(loss),
        mean_per_pair=mean_per_pair,
    )
    picks = torch.randint(len(pairs), (6,), generator=torch.Generator().manual_seed(5)).tolist()
    assert len(set(picks)) == 2  # the seed draws both pairs
    with torch.no_grad():
        nlls = []
        for i in picks:
            p, r = pairs[i]
            logits = reference(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            nlls.append(torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="none"))
    expected = torch.stack([n.mean() for n in nlls]).mean() if mean_per_pair else torch.cat(nlls).mean()
    assert losses[0] == pytest.approx(expected.item(), rel=1e-4)
