"""examples/: every recipe loads and validates, every documented GPU layout passes the parallel check,
the launch scripts parse, and the memory estimate's parameter formula matches real models."""

from __future__ import annotations

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
    cfg = load_config(recipe)
    assert cfg.train.groups_per_step % cfg.train.groups_per_update == 0


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
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dims = memory_estimate.Dims(
        "tiny",
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        head_dim,
        c.tie_word_embeddings,
        arch == "qwen2",
        arch == "qwen3",
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    assert dims.parameters() == sum(p.numel() for p in model.parameters())


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
