"""Routing replay: the trainer's Megatron routers take the engine's expert choices (fp32, CPU, one process)."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_replayed_gradients_match_forced_routing(moe_dir, single_process, recompute):
    """Also under full activation recompute, where the backward runs every layer's forward again after the
    replay block: the routers replay the queued routing there too."""
    from megatron_m2po.config import ParallelConfig

    config = load_hf_config(moe_dir)
    k, b, s = config.num_experts_per_tok, 1, 24
    ids = torch.randint(1, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(8))
    routed = torch.stack(
        [
            torch.randperm(config.num_experts, generator=torch.Generator().manual_seed(i))[:k]
            for i in range(b * s * 2)
        ]
    ).reshape(b, s, config.num_hidden_layers, k)
    model = load_policy(moe_dir, routing_replay=True, parallel=ParallelConfig(recompute=recompute)).train()
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa")
    with replayed_routing(model, routed):
        loss = forward_logits(model, ids).logsumexp(-1).sum()
    loss.backward()  # after the block, as the pipeline schedule runs it
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

    groups = _routed_groups(load_hf_config(moe_dir), lengths=((5, (7,)), (9, (3,))))
    rows = groups_to_rows(groups, torch.zeros(2))
    mb = rows_to_microbatch(rows, consumer_version=0, pad_id=0, pack=pack)
    model = load_policy(moe_dir, routing_replay=True).eval()
    with torch.no_grad():
        ours = token_logprobs(run_model(model, mb), mb, temperature=1.0)
    for i, expected in enumerate(_forced_logprobs(moe_dir, groups)):
        assert (ours[i, : len(expected)] - expected).abs().max().item() <= 1e-4, i


def _routed_groups(config, lengths=((5, (7, 4)), (9, (3, 6))), seed: int = 2):
    """Groups of random tokens (prompt length, response lengths), each sample routed to random experts (what
    an engine reports) and rewarded 1 or 0 in turn."""
    from megatron_m2po.types import Group, Sample

    layers, k, e = config.num_hidden_layers, config.num_experts_per_tok, config.num_experts
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i, (p, responses) in enumerate(lengths):
        prompt = torch.randint(1, config.vocab_size, (p,), generator=g).tolist()
        samples = []
        for j, r in enumerate(responses):
            response = torch.randint(1, config.vocab_size, (r,), generator=g).tolist()
            routed = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range((p + r - 1) * layers)])
            samples.append(
                Sample(
                    f"q{i}",
                    j,
                    prompt,
                    response,
                    [-1.0] * r,
                    [0] * r,
                    "stop",
                    reward=float(j % 2),
                    routed_experts=routed.reshape(p + r - 1, layers, k).numpy().astype("uint8"),
                )
            )
        groups.append(Group(f"q{i}", prompt, samples))
    return groups


def _forced_logprobs(moe_dir, groups) -> list[torch.Tensor]:
    """transformers' log-probs of every sample's tokens [len - 1], its routers forced to the sample's routing
    (the last token, which no engine fed, routed to experts 0..k-1)."""
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa").eval()
    config = reference.config
    layers, k = config.num_hidden_layers, config.num_experts_per_tok
    out = []
    for s in (s for g in groups for s in g.samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        forced = torch.cat(
            [torch.from_numpy(s.routed_experts.astype("int64")), torch.arange(k).expand(1, layers, k)]
        )
        with torch.no_grad(), hf_forced_routing(reference, forced[None]):
            logits = reference(ids).logits[0, :-1]
        out.append(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0])
    return out


def _policy_config(model_dir, **algorithm):
    from megatron_m2po.config import Config

    cfg = Config()
    cfg.model.path, cfg.data.path = str(model_dir), "unused"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 2
    cfg.train.responses_per_prompt, cfg.train.micro_batch_size, cfg.train.lr = 2, 2, 1e-3
    cfg.algorithm.routing_diagnostics_every = 1
    for key, value in algorithm.items():
        setattr(cfg.algorithm, key, value)
    return cfg


def test_config_key_defaults_to_replay_for_moe_and_is_refused_where_it_cannot_run(moe_dir, tmp_path):
    from megatron_m2po.config import ConfigError, routing_replay_on, validate_parallel
    from megatron_m2po.models.tiny import tiny_config

    moe, dense = tiny_config("qwen3_moe"), tiny_config("qwen3")
    assert routing_replay_on(_policy_config(moe_dir), moe) is True  # unset: replay for MoE
    assert routing_replay_on(_policy_config(moe_dir, routing_replay="off"), moe) is False
    assert routing_replay_on(_policy_config(moe_dir), dense) is False
    assert routing_replay_on(_policy_config(moe_dir, routing_replay="off"), dense) is False
    with pytest.raises(ConfigError, match="'algorithm.routing_replay': replay, but .* is a dense model"):
        validate_parallel(_policy_config(moe_dir, routing_replay="replay"), 1, dense)
    vllm = _policy_config(moe_dir)
    vllm.rollout.engine = "vllm"
    with pytest.raises(ConfigError, match="'algorithm.routing_replay': unset .* rollout.engine=vllm"):
        validate_parallel(vllm, 1, moe)
    vllm.algorithm.routing_replay = "off"
    assert validate_parallel(vllm, 1, moe) == 1
    with pytest.raises(ConfigError, match="'algorithm.routing_replay'.*not one of"):
        from megatron_m2po.config import load_config

        load_config(None, ["model.path=m", "data.path=d", "algorithm.routing_replay=on"])


def test_policy_replays_in_the_behaviour_recompute_and_the_update(moe_dir, single_process):
    """rollout.behavior_logprobs=trainer: the recompute forward replays the engine's routing (its log-probs are
    transformers' forced to that routing); the update trains on the replayed forward; with replay off the same
    groups train with the routers' own choices, and replay on refuses samples that carry no routing."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_m2po.trainer.batching import TRAINER_LOGPROBS_KEY
    from megatron_m2po.trainer.policy import Policy
    from megatron_m2po.trainer.routing_diagnostics import routing_diagnostics_collective

    # process-wide in megatron-core: a plain backward (the gradient test above) leaves a 0-dim scale that the
    # pipeline schedule's [1]-shaped one cannot be copied into
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    groups = _routed_groups(load_hf_config(moe_dir))
    policy = Policy(_policy_config(moe_dir))
    assert policy.routing_replay and policy.routed_experts_shape == (2, 2)
    policy.recompute_behavior_logprobs_collective(groups)
    recomputed = [lp for g in groups for lp in g.metadata[TRAINER_LOGPROBS_KEY]]
    samples = [s for g in groups for s in g.samples]
    for s, ours, expected in zip(samples, recomputed, _forced_logprobs(moe_dir, groups), strict=True):
        assert torch.allclose(torch.tensor(ours), expected[len(s.prompt_ids) - 1 :], atol=1e-4)
    own_groups = copy.deepcopy(groups)  # the same samples, routed where the trainer's routers route them
    for s in (s for g in own_groups for s in g.samples):
        with torch.no_grad(), recorded_routing(policy.model) as own:
            forward_logits(policy.model.module, torch.tensor([s.prompt_ids + s.response_ids]))
        s.routed_experts = torch.stack([own[layer] for layer in sorted(own)], 1)[:-1].numpy().astype("uint8")
    rows = policy._rows(own_groups, torch.tensor([1.0, -1.0, 1.0, -1.0]), "engine")
    agreeing = routing_diagnostics_collective(policy.model, policy._microbatches(rows, 0), 1.0)
    assert agreeing["moe/router_agreement"] == 1.0
    assert agreeing["moe/m2_before_replay"] == pytest.approx(agreeing["moe/m2_before_no_replay"], abs=1e-9)
    metrics = policy.update_collective(groups, version=0)
    assert metrics["train/grad_norm"] > 0
    assert metrics["moe/router_agreement"] < 0.5  # random experts agree with 1 / C(8, 2) per token-layer
    assert metrics["moe/m2_before_replay"] != metrics["moe/m2_before_no_replay"]

    off = Policy(_policy_config(moe_dir, routing_replay="off"))
    assert off.routed_experts_shape is None
    assert "moe/router_agreement" not in off.update_collective(groups, version=0)
    groups[1].samples[1].routed_experts = None
    with pytest.raises(ValueError, match="routing_replay is on but samples \\['q1#1'\\] carry no"):
        policy.update_collective(groups, version=1)
