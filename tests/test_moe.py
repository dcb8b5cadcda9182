"""Qwen3-MoE: config validation, parallel layouts, and parity with transformers' own Qwen3-MoE (fp32, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_m2po import platform
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.checkpoint.convert import convert_hf_to_megatron
from megatron_m2po.config import Config, ConfigError, validate, validate_parallel
from megatron_m2po.models import forward_logits, load_hf_config, transformer_config
from megatron_m2po.models.tiny import make_tiny_model, tiny_config
from tests.conftest import REPO, run_torchrun
from tests.moe_reference import assert_clear_margins, hf_topk_masks, megatron_routing

SCRIPT = REPO / "tests" / "dist" / "moe_parallel_parity.py"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe") / "hf", seed=11)


@pytest.fixture(scope="module")
def moe_megatron_dir(moe_dir) -> Path:
    """The converter's checkpoint of `moe_dir` (global tensors: every layout below loads it resharded)."""
    out = convert_hf_to_megatron(
        moe_dir, moe_dir.parent / "megatron", tensor_parallel=2, pipeline_parallel=2, expert_parallel=2
    )
    platform.destroy_distributed()
    return out


def test_tiny_moe_is_transformers_qwen3_moe(moe_dir):
    config = load_hf_config(moe_dir)
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (8, 2, True)
    reference = AutoModelForCausalLM.from_pretrained(moe_dir)
    assert type(reference.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"


def test_logits_and_routing_match_transformers(moe_dir, single_process):
    config = load_hf_config(moe_dir)
    model = load_policy(moe_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa").eval()
    ids = torch.randint(1, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), megatron_routing(model) as seen:
        ours = forward_logits(model, ids)
        theirs = reference(ids, output_router_logits=True)
    assert_clear_margins(theirs.router_logits, config.num_experts_per_tok)
    assert theirs.logits.abs().max() > 0.05
    assert (ours - theirs.logits).abs().max().item() <= 1e-4
    masks = hf_topk_masks(theirs.router_logits, config.num_experts_per_tok, batch=2)
    assert sorted(seen) == list(range(config.num_hidden_layers))
    for layer, (routing_map,) in seen.items():
        assert torch.equal(routing_map, masks[layer].reshape(-1, config.num_experts)), layer


def test_router_options_follow_the_hf_config(moe_dir, single_process):
    config = load_hf_config(moe_dir)
    tc = transformer_config(config)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (8, 2, 32)
    assert tc.moe_router_score_function == "softmax" and tc.moe_router_dtype == "fp32"
    assert tc.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the k chosen logits
    assert tc.moe_aux_loss_coeff == pytest.approx(0.001) and tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.moe_token_dispatcher_type == "allgather" and tc.moe_grouped_gemm is False  # CPU
    off = transformer_config(config, aux_loss_coef=0.0)
    assert off.moe_aux_loss_coeff == 0.0 and off.moe_router_load_balancing_type == "none"
    config.norm_topk_prob = False
    assert transformer_config(config).moe_router_pre_softmax is True


def test_unnormalised_top_k_matches_transformers(tmp_path, single_process):
    """norm_topk_prob=false (the full softmax's top-k probabilities) is the other router of the family."""
    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=4, norm_topk_prob=False)
    model = load_policy(hf_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    ids = torch.randint(1, 320, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = reference(ids, output_router_logits=True)
        assert_clear_margins(out.router_logits, 2)
        assert (forward_logits(model, ids) - out.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ({"mlp_only_layers": [1]}, "mlp_only_layers=\\[1\\] is not supported"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef=-1.0"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2MoeForCausalLM is not supported: .*shared expert"),
    ],
)
def test_unsupported_moe_options_are_refused_by_name(moe_dir, tmp_path, override, message):
    raw = json.loads((moe_dir / "config.json").read_text())
    raw.update(override)
    if override.get("architectures") == ["Qwen2MoeForCausalLM"]:
        raw["model_type"] = "qwen2_moe"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message) as err:
        load_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def _layout(tmp_path, **parallel) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.path = str(tmp_path), "prompts.jsonl"
    cfg.train.groups_per_step = cfg.train.groups_per_update = 8
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        ({"expert": 3}, 3, "'parallel.expert': 3 does not divide the model's num_experts = 8"),
        ({"expert": 2}, 3, "'parallel.expert': .* = 2 does not divide the world size 3"),
        ({"expert": 4, "pipeline": 2}, 4, "1 x 4 x 2 = 8 does not divide the world size 4"),
        ({"tensor": 2}, 2, "'parallel.sequence_parallel': MoE models with parallel.tensor > 1 need it"),
        (
            {"expert": 2, "tensor": 2, "sequence_parallel": True},
            4,
            "'parallel.expert_tensor': 2 does not divide the model's moe_intermediate_size = 33",
        ),
    ],
)
def test_expert_layouts_are_validated_before_megatron_starts(parallel, world, message):
    config = tiny_config("qwen3_moe", moe_intermediate_size=33)
    cfg = _layout("m", **parallel)
    with pytest.raises(ConfigError, match=message):
        validate_parallel(cfg, world, config)


def test_layout_rules_without_a_model(tmp_path):
    cfg = _layout(tmp_path, tensor=2, expert_tensor=1)
    with pytest.raises(ConfigError, match="'parallel.expert_tensor': 1 differs from parallel.tensor=2"):
        validate(cfg)
    cfg = _layout(tmp_path, tensor=2, expert_tensor=3, expert=2)
    with pytest.raises(ConfigError, match="'parallel.expert_tensor': 3 does not divide parallel.tensor=2"):
        validate(cfg)
    with pytest.raises(ConfigError, match="'parallel.expert': 2, but .* is a dense model"):
        validate_parallel(_layout(tmp_path, expert=2), 2, tiny_config("qwen3"))
    assert (
        validate_parallel(_layout(tmp_path, expert=2), 2, tiny_config("qwen3_moe")) == 2
    )  # EP is carved from DP


def test_init_distributed_refuses_an_expert_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="expert_parallel=2"):
        platform.init_distributed(expert_parallel=2)
    platform.destroy_distributed()


@pytest.mark.dist
def test_expert_parallel_matches_transformers(moe_dir, moe_megatron_dir):
    """EP = 2: logits, per-expert gradients from both EP ranks, routing and weights equal transformers';
    the converted checkpoint loads split over the two EP ranks and gathers back bitwise; with routing replay
    the logits equal transformers' forced to the replayed experts (also at TP = 2 with sequence parallelism
    and PP = 2, the slow test below)."""
    proc = run_torchrun(SCRIPT, 2, "ep", moe_dir, moe_megatron_dir)
    assert proc.stdout.count("ep: logits, 69 gradients") == 2
    assert proc.stdout.count("replayed routing of 24 tokens gives its logits") == 2  # each EP rank its rows


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_tensor_and_pipeline_parallel_match_transformers(moe_dir, moe_megatron_dir, mode):
    proc = run_torchrun(SCRIPT, 2, mode, moe_dir, moe_megatron_dir)
    assert f"{mode}: logits, 69 gradients" in proc.stdout
    assert "replayed routing of 48 tokens gives its logits" in proc.stdout


@pytest.mark.dist
@pytest.mark.slow  # ~75 s on a loaded 2-core machine
def test_m2po_train_runs_at_expert_parallel_2(moe_dir, tmp_path):
    """`m2po train` of the tiny Qwen3-MoE at EP = 2 (2 processes): the weight sync after an update gathers the
    experts over the EP group, which spans both data-parallel replicas, so both ranks must take part."""
    import subprocess

    from tests.conftest import subprocess_env, torchrun_prefix

    prompts = _addition_prompts(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {moe_dir}}}
data: {{path: {prompts}, apply_chat_template: true, max_prompt_tokens: 64}}
rollout: {{max_new_tokens: 8, reward_fn: "tests.e2e_rewards:odd_char_fraction", reward_workers: 1}}
algorithm: {{loss: m2po, m2_budget: 0.04}}
staleness: {{mode: bounded}}
train: {{steps: 2, groups_per_step: 2, groups_per_update: 1, responses_per_prompt: 4, micro_batch_size: 4,
         lr: 1.0e-4, torch_threads: 1}}
checkpoint: {{save_at_end: false}}
logging: {{console: none, run_dir: {tmp_path / "run"}}}
parallel: {{expert: 2}}
""")
    cmd = [*torchrun_prefix(2), "-m", "megatron_m2po", "train", "--config", str(recipe)]
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "consumed.jsonl").read_text().splitlines()]
    assert steps and max(s["step"] for s in steps) == 2


def _addition_prompts(tmp_path):
    """32 one-digit addition prompts for the MoE `m2po train` runs."""
    prompts = tmp_path / "prompts.jsonl"
    rows = ({"problem": f"{a}+{b}", "answer": str(a + b)} for a in range(8) for b in range(4))
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return prompts


def test_m2po_trains_a_moe_end_to_end_with_routing_replay(moe_dir, tmp_path):
    """`m2po train` of the tiny Qwen3-MoE (8 experts, top-2) with M2PO, bounded mode, the local engine recording
    its routing and the trainer replaying it (algorithm.routing_replay unset = replay for MoE): every step's
    diagnostics show the engine's routing aligned with the trainer's tokens (an fp32 engine routes like the
    fp32 trainer: agreement near 1, where a shift by one token would give chance, 1 / 28)."""
    import subprocess

    from megatron_m2po.metrics import read_scalars
    from tests.conftest import subprocess_env

    prompts = _addition_prompts(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {moe_dir}}}
data: {{path: {prompts}, apply_chat_template: true, max_prompt_tokens: 64}}
rollout: {{max_new_tokens: 8, reward_fn: "tests.e2e_rewards:odd_char_fraction", reward_workers: 1}}
algorithm: {{loss: m2po, m2_budget: 0.04, routing_diagnostics_every: 1}}
staleness: {{mode: bounded}}
train: {{steps: 2, groups_per_step: 2, groups_per_update: 1, responses_per_prompt: 4, micro_batch_size: 4,
         lr: 1.0e-4, torch_threads: 1}}
checkpoint: {{save_at_end: false}}
logging: {{console: none, run_dir: {tmp_path / "run"}}}
""")
    cmd = [sys.executable, "-m", "megatron_m2po", "train", "--config", str(recipe)]
    env = subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    series = read_scalars(tmp_path / "run")
    for tag in ("moe/router_agreement", "moe/m2_before_replay", "moe/m2_before_no_replay", "loss/m2_before"):
        assert [step for step, _ in series[tag]] == [1, 2], tag
    assert all(value > 0.9 for _, value in series["moe/router_agreement"]), series["moe/router_agreement"]
    assert all(value < 1e-3 for _, value in series["moe/m2_before_replay"]), series["moe/m2_before_replay"]
