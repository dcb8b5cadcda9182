"""Routing replay: the trainer's Megatron routers take the engine's expert choices (fp32, CPU, one process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config
from megatron_m2po.models.routing_replay import recorded_routing, replayed_routing
from megatron_m2po.models.tiny import make_tiny_model
from tests.moe_reference import assert_clear_margins, hf_forced_routing, hf_routed_experts, megatron_routing


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe") / "hf", seed=11)


def _perturb_routers(model, reference, scale: float = 0.5) -> None:
    """The same noise on both models' router weights: they now route differently from the engine."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                layer = int(name.split(".")[2])
                noise = torch.randn(param.shape, generator=g) * scale
                param.add_(noise)
                reference.model.layers[layer].mlp.gate.weight.add_(noise)


def _sets(indices: torch.Tensor) -> torch.Tensor:
    return indices.sort(dim=-1).values


def test_replay_makes_the_trainer_route_like_the_engine(moe_dir, single_process):
    config = load_hf_config(moe_dir)
    k, b, s = config.num_experts_per_tok, 2, 40
    ids = torch.randint(1, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(3))
    engine = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        out = engine(ids, output_router_logits=True)
    assert_clear_margins(out.router_logits, k)
    routed = hf_routed_experts(out.router_logits, k, batch=b)  # [b, s, layers, k]: the engine's choice

    model = load_policy(moe_dir, routing_replay=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa").eval()
    _perturb_routers(model, reference)
    with torch.no_grad(), recorded_routing(model) as own:
        free = forward_logits(model, ids)
    engine_sets = _sets(routed.transpose(0, 1).reshape(s * b, config.num_hidden_layers, k))
    disagree = [(_sets(own[layer]) != engine_sets[:, layer]).any(-1).float().mean().item() for layer in own]
    assert min(disagree) > 0.1, disagree  # the perturbed trainer would route differently on its own

    with torch.no_grad(), megatron_routing(model) as seen, replayed_routing(model, routed):
        replayed = forward_logits(model, ids)
    for layer, (routing_map,) in seen.items():
        chosen = _sets(routing_map.nonzero()[:, 1].reshape(-1, k))
        assert torch.equal(chosen, engine_sets[:, layer]), layer
    with torch.no_grad(), hf_forced_routing(reference, routed):
        forced = reference(ids).logits
    assert (replayed - forced).abs().max().item() <= 1e-4
    # without replay the trainer's logits are another model's
    assert (free - forced).abs().max().item() > 1e-2

    # replay ends with the block: the next forward routes on its own again
    with torch.no_grad():
        assert torch.allclose(forward_logits(model, ids), free, atol=1e-6)


def test_replayed_gradients_match_forced_routing(moe_dir, single_process):
    config = load_hf_config(moe_dir)
    k, b, s = config.num_experts_per_tok, 1, 24
    ids = torch.randint(1, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(8))
    routed = torch.stack(
        [
            torch.randperm(config.num_experts, generator=torch.Generator().manual_seed(i))[:k]
            for i in range(b * s * 2)
        ]
    ).reshape(b, s, config.num_hidden_layers, k)
    model = load_policy(moe_dir, routing_replay=True)
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa")
    with replayed_routing(model, routed):
        forward_logits(model, ids).logsumexp(-1).sum().backward()
    with hf_forced_routing(reference, routed):
        reference(ids).logits.logsumexp(-1).sum().backward()
    for layer in range(config.num_hidden_layers):
        ours = dict(model.named_parameters())[f"decoder.layers.{layer}.mlp.router.weight"].grad
        theirs = reference.model.layers[layer].mlp.gate.weight.grad
        assert ours.abs().max() > 0
        assert (ours - theirs).abs().max().item() <= 1e-4, layer


def test_replay_refuses_a_model_built_without_it_and_bad_shapes(moe_dir, single_process):
    config = load_hf_config(moe_dir)
    plain = load_policy(moe_dir)
    with pytest.raises(ValueError, match="routing_replay=True"):
        with replayed_routing(plain, torch.zeros(1, 4, config.num_hidden_layers, 2, dtype=torch.long)):
            pass
    model = load_policy(moe_dir, routing_replay=True)
    with pytest.raises(ValueError, match="top_k=3"):
        with replayed_routing(model, torch.zeros(1, 4, config.num_hidden_layers, 3, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="expert ids outside"):
        with replayed_routing(model, torch.full((1, 4, config.num_hidden_layers, 2), 99)):
            pass


@pytest.mark.parametrize("pack", [False, True])
def test_training_forward_replays_the_samples_routing(moe_dir, single_process, pack):
    """Groups -> rows -> micro-batch (padded or packed) -> run_model: each sequence's log-probs are those of
    transformers' model forced to the engine's routing; the last token and padding take experts 0..k-1."""
    from megatron_m2po.trainer.batching import groups_to_rows, rows_to_microbatch
    from megatron_m2po.trainer.step import run_model, token_logprobs
    from megatron_m2po.types import Group, Sample

    config = load_hf_config(moe_dir)
    layers, k, e = config.num_hidden_layers, config.num_experts_per_tok, config.num_experts
    g = torch.Generator().manual_seed(2)
    samples = []
    for i, (p, r) in enumerate(((5, 7), (9, 3))):
        prompt = torch.randint(1, config.vocab_size, (p,), generator=g).tolist()
        response = torch.randint(1, config.vocab_size, (r,), generator=g).tolist()
        routed = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range((p + r - 1) * layers)])
        samples.append(
            Sample(
                "q",
                i,
                prompt,
                response,
                [0.0] * r,
                [0] * r,
                "stop",
                routed_experts=routed.reshape(p + r - 1, layers, k).numpy().astype("uint8"),
            )
        )
    groups = [
        Group("q", samples[0].prompt_ids, [samples[0]]),
        Group("q2", samples[1].prompt_ids, [samples[1]]),
    ]
    rows = groups_to_rows(groups, torch.zeros(2))
    mb = rows_to_microbatch(rows, consumer_version=0, pad_id=0, pack=pack)
    model = load_policy(moe_dir, routing_replay=True).eval()
    with torch.no_grad():
        ours = token_logprobs(run_model(model, mb), mb, temperature=1.0)
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa").eval()
    for i, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        forced = torch.cat(
            [torch.from_numpy(s.routed_experts.astype("int64")), torch.arange(k).expand(1, layers, k)]
        )
        with torch.no_grad(), hf_forced_routing(reference, forced[None]):
            logits = reference(ids).logits[0, :-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        n = ids.shape[1] - 1
        assert (ours[i, :n] - expected).abs().max().item() <= 1e-4, i
