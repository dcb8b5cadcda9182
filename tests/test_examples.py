"""examples/: every recipe loads and validates, every documented GPU layout passes the parallel check,
the launch scripts parse, and the memory estimate's parameter formula matches real models."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_m2po.config import load_config, validate_parallel

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RECIPES = sorted(EXAMPLES.glob("*/*.yaml"))
MODEL_DIRS = sorted(p.parent for p in EXAMPLES.glob("*/launch.sh"))

sys.path.insert(0, str(EXAMPLES))
import memory_estimate  # noqa: E402


def test_there_is_a_recipe_per_model_size():
    names = {p.name for p in MODEL_DIRS}
    assert {"qwen3_1.7b", "qwen3_8b", "qwen2.5_math_7b", "qwen2.5_32b", "qwen3_32b"} <= names
    assert (EXAMPLES / "cpu_demo" / "config.yaml") in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads_and_validates(recipe):
    from megatron_m2po.rollout.environments import environment_class

    cfg = load_config(recipe)
    assert cfg.train.groups_per_step % cfg.train.groups_per_update == 0
    # the environment's own settings, checked when the rollout side is built
    environment_class(cfg.rollout.env).parse_settings(cfg.rollout.env_settings)


def test_tool_math_recipe_fits_its_trajectories():
    """The tool recipe's micro-batch holds the longest trajectory: the prompt, the tool's schema in the system
    prompt (measured with the real Qwen3 template on the tiny byte-level tokenizer: an upper bound of Qwen3's
    BPE count) and the trajectory's token budget."""
    from qwen3_chat import qwen3_tokenizer

    from megatron_m2po.rollout.environments.tool_math import PYTHON_TOOL_SCHEMA

    cfg = load_config(EXAMPLES / "qwen3_8b_tool_math" / "recipe.yaml")
    settings = cfg.rollout.env_settings
    assert cfg.rollout.env == "tool_math" and settings["max_total_tokens"] <= cfg.rollout.max_new_tokens
    tok = qwen3_tokenizer()
    question = [{"role": "user", "content": ""}]

    def tokens(**tools) -> int:
        text = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False, **tools)
        return len(tok.encode(text, add_special_tokens=False))

    schema_tokens = tokens(tools=[PYTHON_TOOL_SCHEMA]) - tokens()
    assert schema_tokens > 100  # the schema and its instructions are in the system prompt
    longest = cfg.data.max_prompt_tokens + schema_tokens + settings["max_total_tokens"]
    assert cfg.train.max_tokens_per_microbatch >= longest, (schema_tokens, longest)


def _layout_rows(readme: Path) -> list[tuple[int, int, int, int]]:
    """(trainer GPUs, TP, PP, DP) of each row of the README's GPU table."""
    rows = re.findall(r"^\| \d+ \| (\d+) \([^)]*\) \| (\d+) x (\d+) x (\d+) \|", readme.read_text(), re.M)
    return [tuple(map(int, r)) for r in rows]


@pytest.mark.parametrize("example", MODEL_DIRS, ids=lambda p: p.name)
def test_documented_layouts_pass_the_parallel_check(example):
    rows = _layout_rows(example / "README.md")
    assert len(rows) >= 3, f"{example}/README.md: expected a GPU table with one row per node count"
    for recipe in sorted(example.glob("*.yaml")):
        cfg = load_config(recipe)
        for gpus, tp, pp, dp in rows:
            assert (tp, pp) == (cfg.parallel.tensor, cfg.parallel.pipeline), (
                f"{recipe}: README layout {tp}x{pp}"
            )
            assert tp * pp * dp == gpus
            assert validate_parallel(cfg, gpus) == dp


def test_paper_recipe_is_the_paper_protocol():
    cfg = load_config(EXAMPLES / "qwen2.5_math_7b" / "paper_s256.yaml")
    t = cfg.train
    assert (t.groups_per_step, t.responses_per_prompt, t.groups_per_update) == (256, 8, 64)
    assert (t.lr, t.weight_decay, t.grad_clip, cfg.algorithm.m2_budget) == (1e-6, 0.01, 1.0, 0.04)
    assert (cfg.rollout.max_new_tokens, cfg.data.max_prompt_tokens) == (2560, 1536)
    assert cfg.staleness.mode == "fixed" and cfg.fixed_lag_updates == 256


@pytest.mark.parametrize(
    "script",
    [*EXAMPLES.glob("*/launch.sh"), *EXAMPLES.glob("*/slurm.sbatch"), EXAMPLES / "common" / "node.sh"],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_node_script_refuses_to_start_without_its_settings(tmp_path):
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "common" / "node.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "RECIPE" in proc.stderr


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_parameter_formula_matches_a_real_model(arch):
    from transformers import AutoModelForCausalLM

    from megatron_m2po.models.tiny import tiny_config

    c = tiny_config(
        arch,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    assert _dims_of(c, arch).parameters() == sum(p.numel() for p in model.parameters())


def _dims_of(c, arch: str) -> memory_estimate.Dims:
    """memory_estimate's dimensions of a transformers config of family `arch`."""
    return memory_estimate.Dims(
        "tiny",
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        c.tie_word_embeddings,
        arch == "qwen2",
        arch.startswith("qwen3"),
        getattr(c, "num_experts", 0),
        getattr(c, "num_experts_per_tok", 0),
        getattr(c, "moe_intermediate_size", 0),
    )


def test_parameter_counts_match_the_published_totals():
    # the safetensors total published with Qwen2.5-7B / Qwen2.5-Math-7B
    assert memory_estimate.MODELS["qwen2.5-math-7b"].parameters() == 7_615_616_512
    est = memory_estimate.estimate("qwen3-8b", tp=4, pp=1, engine_tp=1)
    assert est["trainer_gib_per_gpu"] == pytest.approx(8_190_735_360 * 18 / 4 / 2**30)


def test_gpu_staleness_sweep_jobs_validate_against_the_recipe():
    """SUBMIT=echo prints gpu_sweep.sh's jobs: the grid (s = 0 only as on_policy), each a valid
    Qwen3-1.7B recipe at exactly s updates of staleness."""
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "staleness_sweep" / "gpu_sweep.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "SUBMIT": "echo"},
        cwd=EXAMPLES.parent,
        check=True,
    )
    jobs = {}
    for line in proc.stdout.splitlines():
        script, *overrides = line.split()
        assert script == "examples/qwen3_1.7b/launch.sh"
        cfg = load_config(EXAMPLES / "qwen3_1.7b" / "recipe.yaml", overrides)
        jobs[(cfg.algorithm.loss, cfg.fixed_lag_updates)] = cfg
    expected = {("on_policy", 0)} | {
        (loss, s) for loss in ("grpo", "grpo_noclip", "m2po", "m2po_clip") for s in (4, 16, 64, 256)
    }
    assert set(jobs) == expected
    for cfg in jobs.values():
        assert cfg.rollout.behavior_logprobs == "trainer" and cfg.train.steps == 1000


# ------------------------------------------------------------------------------ mixture-of-experts recipes

MOE_EXAMPLES = {"qwen3_30b_a3b": "qwen3-30b-a3b", "qwen3_235b_a22b": "qwen3-235b-a22b"}


def _moe_hf_config(d: memory_estimate.Dims):
    """The HF config of a model with `d`'s published dimensions (what validate_parallel reads from config.json)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=d.vocab,
        hidden_size=d.hidden,
        num_hidden_layers=d.layers,
        intermediate_size=d.intermediate,
        num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads,
        head_dim=d.head_dim,
        tie_word_embeddings=d.tied,
        num_experts=d.experts,
        num_experts_per_tok=d.top_k,
        moe_intermediate_size=d.moe_intermediate,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


@pytest.mark.parametrize("example,model", MOE_EXAMPLES.items())
def test_moe_layouts_validate_against_the_model_and_match_the_estimate(example, model):
    """Every row of the MoE READMEs' GPU tables passes validate_parallel with the model's own config (EP
    divides the experts, heads / layers / vocabulary split evenly, sequence parallelism on under TP), and
    the memory tables print what examples/memory_estimate.py computes for the recipe's settings."""
    readme = (EXAMPLES / example / "README.md").read_text()
    cfg = load_config(EXAMPLES / example / "recipe.yaml")
    hf = _moe_hf_config(memory_estimate.MODELS[model])
    rows = re.findall(
        r"^\| \d+ \| (\d+) \([^)]*\) \| (\d+) x (\d+) x (\d+) \| (\d+) \((\d+)\) \|", readme, re.M
    )
    assert len(rows) >= 3
    for gpus, tp, pp, dp, ep, etp in (tuple(map(int, r)) for r in rows):
        assert (tp, pp, ep, etp) == (
            cfg.parallel.tensor,
            cfg.parallel.pipeline,
            cfg.parallel.expert,
            cfg.parallel.expert_tensor_size,
        )
        assert validate_parallel(cfg, gpus, hf) == dp
    cfg.parallel.context = 2  # the READMEs' long-response variant: DP halves, the expert grid stays
    gpus, dp = int(rows[0][0]), int(rows[0][3])
    assert validate_parallel(cfg, gpus, hf) == dp // 2
    cfg.parallel.context = 1
    memory = re.findall(
        r"^\| (\d+) x (\d+) x (\d+) \| (\d+) \((\d+)\) \| ([\d.]+) GiB \| ([\d.]+) GiB \| ([\d.]+) GiB \|",
        readme,
        re.M,
    )
    assert len(memory) >= 2
    for *layout, states, activations, recomputed in memory:
        tp, pp, dp, ep, etp = map(int, layout)
        common = dict(
            dp=dp,
            distributed_optimizer=cfg.parallel.distributed_optimizer,
            tokens=cfg.train.max_tokens_per_microbatch,
            sequence_parallel=cfg.parallel.sequence_parallel,
            ep=ep,
            etp=etp,
        )
        e = memory_estimate.estimate(model, tp, pp, 8, **common)
        full = memory_estimate.estimate(model, tp, pp, 8, recompute="full", **common)
        assert (states, activations, recomputed) == (
            f"{e['trainer_gib_per_gpu']:.1f}",
            f"{e['activations_gib_per_gpu']:.1f}",
            f"{full['activations_gib_per_gpu']:.1f}",
        )


def test_moe_parameter_formula_matches_a_real_qwen3_moe():
    from transformers import AutoModelForCausalLM

    from megatron_m2po.models.tiny import tiny_config

    c = tiny_config(
        "qwen3_moe", hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2
    )
    dims = _dims_of(c, "qwen3_moe")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    params = dict(model.named_parameters())
    assert dims.parameters() == sum(p.numel() for p in params.values())
    assert dims.expert_parameters() == sum(p.numel() for n, p in params.items() if ".experts." in n)


def test_moe_memory_estimate_by_hand(monkeypatch):
    """A toy MoE (hidden 64, 2 layers, 8 experts of width 32, top-2, vocabulary 1000) at TP 2, PP 1, DP 4,
    EP 4, ETP 1 (8 ranks, expert-data-parallel 2) with the distributed optimizer, worked out by hand:
    dense parameters per layer: attention 3 x 64 x 64 + 2 x 64 x 32 = 16384 - 4096 = 12288, router 64 x 8 =
    512, norms 2 x 64 + 2 x 16 = 160, so 2 x 12960 + embeddings 2 x 1000 x 64 + final norm 64 = 153984;
    experts 2 x 8 x 3 x 64 x 32 = 98304. Model states: dense 153984 / TP 2 x (18 - 12 x 3/4 = 9 B), experts
    98304 / (ETP 1 x EP 4) x (18 - 12 x 1/2 = 12 B) = 692928 + 294912 bytes. Activations per token and layer
    with sequence parallelism: attention 15 x 64 / 2 = 480, and for the half of the tokens this rank routes,
    router 8 x 8 = 64 + 2 experts x (2 x 64 + 8 x 32) = 768: 416; x 2 layers x 100 tokens. Without sequence
    parallelism at ETP 2: 64 x (7 + 8 / 2) = 704 + 64 + 2 x (128 + 8 x 32 / 2) = 1280 per token and layer."""
    toy = memory_estimate.Dims("toy", 1000, 64, 2, 0, 4, 2, 16, False, False, True, 8, 2, 32)
    monkeypatch.setitem(memory_estimate.MODELS, "toy", toy)
    assert toy.parameters() == 153984 + 98304 and toy.expert_parameters() == 98304
    assert toy.active_parameters() == 153984 + 98304 // 4
    gib = memory_estimate.GIB
    e = memory_estimate.estimate(
        "toy", 2, 1, 1, dp=4, distributed_optimizer=True, tokens=100, sequence_parallel=True, ep=4, etp=1
    )
    assert e["trainer_gib_per_gpu"] * gib == pytest.approx(692928 + 294912)
    assert e["activations_gib_per_gpu"] * gib == pytest.approx((480 + 416) * 2 * 100)
    no_sp = memory_estimate.estimate("toy", 2, 1, 1, dp=4, tokens=100, ep=4, etp=2)
    assert no_sp["activations_gib_per_gpu"] * gib == pytest.approx(1280 * 2 * 100)
    assert no_sp["trainer_gib_per_gpu"] * gib == pytest.approx(153984 * 18 / 2 + 98304 * 18 / (2 * 4))
    with pytest.raises(ValueError, match="does not divide the world"):
        memory_estimate.estimate("toy", 2, 1, 1, dp=3, ep=4, etp=1)
    # context parallelism 2 at DP 2 (the same 8 ranks): half the tokens per rank, the dense optimizer state over
    # DP x CP = 4 as before, the experts' as before (expert-DP 2)
    cp = memory_estimate.estimate(
        "toy",
        2,
        1,
        1,
        dp=2,
        cp=2,
        distributed_optimizer=True,
        tokens=100,
        sequence_parallel=True,
        ep=4,
        etp=1,
    )
    assert cp["trainer_gib_per_gpu"] * gib == pytest.approx(692928 + 294912)
    assert cp["activations_gib_per_gpu"] * gib == pytest.approx((480 + 416) * 2 * 50)


def _sglang_flags(fields_dir: Path) -> set[str]:
    """Every command-line flag of the pinned SGLang's server arguments (arg_groups/fields: a field `x_y` is
    `--x-y`, plus its Arg aliases and cli_name; fields marked no_cli have none)."""
    flags = set()
    for path in fields_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            kwargs = {
                k.arg: k.value
                for call in ast.walk(node.annotation)
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "Arg"
                for k in call.keywords
            }
            if "no_cli" in kwargs and ast.literal_eval(kwargs["no_cli"]):
                continue
            flags.add(
                ast.literal_eval(kwargs["cli_name"])
                if "cli_name" in kwargs
                else "--" + node.target.id.replace("_", "-")
            )
            if "aliases" in kwargs:
                flags.update(ast.literal_eval(kwargs["aliases"]))
    return flags


def test_recipes_engine_flags_exist_in_the_pinned_sglang():
    """The SGLang flags the launchers pass (ENGINE_ARGS) are flags of the pinned sglang==0.5.23
    (srt/arg_groups/fields, extracted by .ci/run)."""
    from megatron_m2po.rollout.engines.sglang import SGLANG_VERSION

    fields = Path(os.environ.get("M2PO_SGLANG_SRC", f"~/.cache/m2po_ci/sglang-{SGLANG_VERSION}")).expanduser()
    fields = fields / "sglang/srt/arg_groups/fields"
    if not fields.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{fields} missing (.ci/run extracts it)")
        pytest.skip(f"{fields} missing (.ci/run extracts it)")
    known = _sglang_flags(fields)
    assert {"--ep-size", "--tp-size", "--mem-fraction-static", "--attn-dp-size"} <= known
    assert "--enable-dp-attention" not in known  # 0.5.23: no_cli, spelled --attn-dp-size
    used = {}
    for launch in EXAMPLES.glob("*/launch.sh"):
        match = re.search(r'ENGINE_ARGS=\$\{ENGINE_ARGS:-"([^"]*)"\}', launch.read_text())
        if match:
            used[launch.parent.name] = [a for a in match.group(1).split() if a.startswith("--")]
    assert set(MOE_EXAMPLES) <= set(used)
    for example, flags in used.items():
        assert set(flags) <= known, (example, set(flags) - known)
