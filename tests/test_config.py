"""Config: YAML + overrides with typed parsing, and every kind of bad input rejected naming the key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_m2po.config import (
    ConfigError,
    load_config,
    parse_override,
    reference_markdown,
    validate_parallel,
)

RECIPE = """
model: {path: /models/tiny}
data: {path: /data/train.jsonl}
train: {lr: 1e-6, groups_per_step: 8, groups_per_update: 4, responses_per_prompt: 4}
staleness: {mode: bounded, max_staleness: 4}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(RECIPE)
    return p


def test_yaml_and_overrides_are_typed(recipe):
    cfg = load_config(
        recipe,
        ["algorithm.m2_budget=0.05", "train.steps=7", "rollout.urls=[a,b]", "logging.tensorboard=false"],
    )
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert cfg.algorithm.m2_budget == 0.05
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.rollout.urls == ["a", "b"]
    assert cfg.logging.tensorboard is False
    assert cfg.updates_per_step == 2


def test_optional_keys_take_null_and_choices_come_from_the_literal_type(recipe):
    cfg = load_config(recipe, ["algorithm.clip_eps=0.1", "algorithm.clip_eps=null", "algorithm.loss=gspo"])
    assert cfg.algorithm.clip_eps is None and cfg.algorithm.loss == "gspo"
    assert "`algorithm.loss` | `'m2po'` | policy loss (algorithms.get_loss name). One of: m2po, " in (
        reference_markdown()
    )


def test_fixed_lag_is_k_times_updates_per_step(recipe):
    cfg = load_config(recipe, ["staleness.mode=fixed", "staleness.fixed_lag_steps=3"])
    assert cfg.fixed_lag_updates == 3 * 2
    assert load_config(recipe, ["staleness.mode=sync"]).fixed_lag_updates == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.m2_budgt=0.1", "did you mean 'algorithm.m2_budget'"),
        ("trian.lr=0.1", "did you mean 'train'"),
        ("lr=0.1", "did you mean 'train.lr'"),
        ("train.lr=fast", "'train.lr': expected a number"),
        ("train.steps=1.5", "'train.steps': expected an integer"),
        ("train.steps=0", "'train.steps': must be >= 1"),
        ("rollout.top_p=1.5", "'rollout.top_p': must be <= 1"),
        ("staleness.mode=boundd", "did you mean 'bounded'"),
        ("train.groups_per_update=3", "'train.groups_per_update': 3 does not divide"),
        ("logging.tensorboard=maybe", "'logging.tensorboard': expected true/false"),
        ("staleness.fixed_lag_steps=2", "only used in fixed mode"),
        ("rollout.behavior_logprobs=trainer", "needs staleness.mode sync or fixed"),
        ("algorithm.dual_clip=0.5", "'algorithm.dual_clip'"),
        ("algorithm.loss=m2p0", "'algorithm.loss': 'm2p0' is not one of .*did you mean 'm2po'"),
        ("algorithm.aggregation=token_mean", "did you mean 'token-mean'"),
        ("algorithm.clip_eps=0", "'algorithm.clip_eps': must be > 0"),
        ("algorithm.tis_cap=2", "'algorithm.tis_cap' is no longer a key: .* algorithm.tis_ratio_cap"),
        ("staleness.max_staleness=-1", "'staleness.max_staleness': must be >= 0"),
        ("eval.benchmarks=[math500,aime2024]", "'aime2024' is not a shipped .*did you mean 'aime24'"),
        ("eval.every=5", "'eval.benchmarks': name at least one .*set eval.path.* when eval.every > 0"),
        ("model.path=", "'model.path': required"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(recipe, [override])


@pytest.mark.parametrize(
    "old, new",
    [
        ("train.prompts_per_step", "train.groups_per_step"),
        ("train.prompts_per_update", "train.groups_per_update"),
        ("eval.samples_per_prompt", "eval.responses_per_prompt"),
    ],
)
def test_renamed_keys_are_refused_naming_the_new_key(recipe, tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"command line: '{old}' is no longer a key: it is now {new}"):
        load_config(recipe, [f"{old}=2"])
    section, name = old.split(".")
    old_recipe = tmp_path / "old.yaml"
    old_recipe.write_text(f"{section}:\n  {name}: 2\n")
    with pytest.raises(ConfigError, match=f"old.yaml: '{old}' is no longer a key: it is now {new}"):
        load_config(old_recipe)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  lr: 1e-6\n  warmup: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'train.warmup'; did you mean 'train.warmup_updates'"
    ):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(bad)


def test_data_parallel_must_divide_the_update(recipe):
    cfg = load_config(
        recipe,
        [
            "train.responses_per_prompt=3",
            "train.groups_per_update=1",
            "train.groups_per_step=1",
            "staleness.max_staleness=0",
        ],
    )
    assert validate_parallel(cfg, 1) == 1
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 2"):
        validate_parallel(cfg, 2)
    cfg = load_config(recipe, ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        validate_parallel(cfg, 3)


@given(st.floats(min_value=1e-9, max_value=10, allow_nan=False))
def test_float_overrides_roundtrip(x):
    key, value = parse_override(f"train.lr={x!r}")
    assert key == "train.lr" and float(value) == x


def test_every_field_has_help():
    text = reference_markdown()
    assert "`algorithm.m2_budget`" in text and "| `train.lr` |" in text
    assert "|  |" not in text


def test_a_tensor_parallel_size_that_cannot_split_the_model_is_a_config_error(tmp_path):
    """`parallel.tensor=3` was a traceback from inside Megatron; now a config error naming the key, before
    Megatron is initialised (exit code 2, no traceback)."""
    import subprocess
    import sys

    from megatron_m2po.models import load_hf_config
    from megatron_m2po.models.tiny import make_tiny_model
    from tests.conftest import REPO, subprocess_env

    model_dir = make_tiny_model("qwen3", tmp_path / "tiny")  # 4 attention heads, 2 KV heads
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("/models/tiny", str(model_dir)))
    cfg = load_config(recipe, ["parallel.tensor=3"])
    model = load_hf_config(model_dir)
    with pytest.raises(ConfigError, match=r"'parallel.tensor': 3 does not divide the model's num_attention_head"):
        validate_parallel(cfg, 3, model)
    cfg = load_config(recipe, ["parallel.pipeline=3"])
    with pytest.raises(ConfigError, match=r"'parallel.pipeline': 3 does not divide the model's num_hidden_lay"):
        validate_parallel(cfg, 3, model)
    assert validate_parallel(load_config(recipe, ["parallel.tensor=2"]), 2, model) == 1

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_m2po.train", "--config", str(recipe), "parallel.tensor=3",
         f"logging.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: 'parallel.tensor' x 'parallel.pipeline' = 3 does not divide the world size 1" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr and not run_dir.exists()
