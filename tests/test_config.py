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
        [
            "algorithm.m2_budget=0.05",
            "train.steps=7",
            "rollout.urls=[a,b]",
            "logging.backends=[wandb,mlflow]",
        ],
    )
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert cfg.algorithm.m2_budget == 0.05
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.rollout.urls == ["a", "b"]
    assert cfg.logging.backends == ["wandb", "mlflow"]
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
        ("logging.histograms=maybe", "'logging.histograms': expected true/false"),
        (
            "logging.tensorboard=false",
            "'logging.tensorboard' is no longer a key: .*logging.backends=.tensorboard.",
        ),
        (
            "logging.backends=[tensorboard,wanb]",
            "'logging.backends': 'wanb' is not one of .*did you mean 'wandb'",
        ),
        ("logging.backends=[mlflow,mlflow]", "'logging.backends': .* names one twice"),
        ("staleness.fixed_lag_steps=2", "only used in fixed mode"),
        ("rollout.behavior_logprobs=trainer", "needs staleness.mode sync or fixed"),
        ("algorithm.dual_clip=0.5", "'algorithm.dual_clip'"),
        ("algorithm.loss=m2p0", "'algorithm.loss': 'm2p0' is not one of .*did you mean 'm2po'"),
        ("algorithm.aggregation=token_mean", "did you mean 'token-mean'"),
        ("algorithm.clip_eps=0", "'algorithm.clip_eps': must be > 0"),
        ("algorithm.tis_cap=2", "'algorithm.tis_cap' is no longer a key: .* algorithm.tis_ratio_cap"),
        (
            "algorithm.engine_mismatch_tis=true",
            "'algorithm.engine_mismatch_tis' is no longer a key: .*algorithm.rollout_corrections=[token_tis]",
        ),
        (
            "algorithm.rollout_corrections=[token_mis]",
            "'algorithm.rollout_corrections': token_mis weights the loss .*needs rollout.behavior_logprobs=trainer",
        ),
        (
            "algorithm.rollout_corrections=[icepop,icepop]",
            "'algorithm.rollout_corrections': a rule is listed twice",
        ),
        (
            "algorithm.rollout_corrections=[icepp]",
            "'algorithm.rollout_corrections': 'icepp' is not one of .*'icepop'",
        ),
        ("algorithm.icepop_high=0", "'algorithm.icepop_high': must be > 0"),
        ("rollout.local_dtype=float16", "'rollout.local_dtype': 'float16' is not one of"),
        (
            "algorithm.overlong_buffer=100000",
            "'algorithm.overlong_buffer': 100000 is longer than rollout.max_new_tokens",
        ),
        ("staleness.max_staleness=-1", "'staleness.max_staleness': must be >= 0"),
        ("rollout.dynamic_sampling_min_std=-0.1", "'rollout.dynamic_sampling_min_std': must be >= 0"),
        ("rollout.dynamic_sampling_max_oversampling=0.5", "'rollout.dynamic_sampling_max_oversampling': must be >= 1"),
        (
            "rollout.dynamic_sampling_min_std=0.2",
            "'rollout.dynamic_sampling_min_std': set, but rollout.dynamic_sampling is off",
        ),
        (
            "eval.benchmarks=[math500,aime2024]",
            "'eval.benchmarks': 'aime2024' is not one of .*did you mean 'aime24'",
        ),
        ("eval.every=5", "'eval.benchmarks': name at least one .*set eval.path.* when eval.every > 0"),
        ("model.path=", "'model.path': required"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(recipe, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(recipe, [override])


def test_a_correction_band_must_be_a_band(recipe):
    with pytest.raises(
        ConfigError, match="'algorithm.geo_mask_low': 1.2 must be below algorithm.geo_mask_high=1.1"
    ):
        load_config(recipe, ["algorithm.geo_mask_low=1.2", "algorithm.geo_mask_high=1.1"])
    sync = [
        "staleness.mode=sync",
        "rollout.behavior_logprobs=trainer",
        "algorithm.rollout_corrections=[token_tis]",
    ]
    assert load_config(recipe, sync).algorithm.rollout_corrections == ["token_tis"]


def test_dynamic_sampling_needs_groups_that_can_vary(recipe):
    on = ["rollout.dynamic_sampling=true", "train.responses_per_prompt=1"]
    with pytest.raises(ConfigError, match="'rollout.dynamic_sampling': needs train.responses_per_prompt >= 2"):
        load_config(recipe, on)
    cfg = load_config(recipe, [on[0], "train.responses_per_prompt=2", "rollout.dynamic_sampling_min_std=0.2"])
    assert cfg.rollout.dynamic_sampling and cfg.rollout.dynamic_sampling_min_std == 0.2


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
    """`parallel.tensor=3` is a config error naming the key, raised before Megatron is initialised (exit code
    2, no traceback), not a traceback from inside Megatron."""
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
    with pytest.raises(
        ConfigError, match=r"'parallel.tensor': 3 does not divide the model's num_attention_head"
    ):
        validate_parallel(cfg, 3, model)
    cfg = load_config(recipe, ["parallel.pipeline=3"])
    with pytest.raises(
        ConfigError, match=r"'parallel.pipeline': 3 does not divide the model's num_hidden_lay"
    ):
        validate_parallel(cfg, 3, model)
    assert validate_parallel(load_config(recipe, ["parallel.tensor=2"]), 2, model) == 1

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_m2po", "train", "--config", str(recipe), "parallel.tensor=3",
         f"logging.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "config error: 'parallel.tensor' x 'parallel.pipeline' x 'parallel.context' = 3 x 1 x 1 = 3 does not "
        "divide the world size 1" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def _float_keys() -> list[str]:
    import dataclasses
    import typing

    from megatron_m2po.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        keys += [
            f"{section.name}.{f.name}"
            for f in dataclasses.fields(cls)
            if float in (hints[f.name], *typing.get_args(hints[f.name]))
        ]
    return keys


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_refuses_infinity_and_nan(recipe, key):
    assert len(_float_keys()) > 10  # found generically, not listed by hand
    for value in (".inf", "-.inf", ".nan", "inf", "nan", "1e999"):
        with pytest.raises(ConfigError, match=rf"'{key}': expected a finite number, got"):
            load_config(recipe, [f"{key}={value}"])
    section, name = key.split(".")
    in_file = recipe.with_name("inf.yaml")
    in_file.write_text(
        f"model: {{path: /models/tiny}}\ndata: {{path: d.jsonl}}\n{section}: {{{name}: .inf}}\n"
    )
    with pytest.raises(ConfigError, match=rf"inf.yaml: '{key}': expected a finite number, got inf"):
        load_config(in_file)


def test_integers_are_bounded_by_what_torch_and_numpy_take(recipe):
    assert load_config(recipe, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    for seed in (2**32, 2**64, 2**64 + 1, 10**30):
        with pytest.raises(ConfigError, match=r"'train.seed': must be <= 4294967295"):
            load_config(recipe, [f"train.seed={seed}"])
    with pytest.raises(ConfigError, match=r"'staleness.queue_capacity': must fit a signed 64-bit integer"):
        load_config(recipe, [f"staleness.queue_capacity={2**70}"])
    with pytest.raises(ConfigError, match=r"'train.steps': must fit a signed 64-bit integer"):
        load_config(recipe, ["train.steps=1.0e+300"])
    huge = recipe.with_name("huge.yaml")
    huge.write_text(RECIPE + "train:\n  seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"huge.yaml: line 7, column 9: an integer of 5000 characters"):
        load_config(huge)


def test_a_recipe_that_is_not_utf8_is_a_config_error_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model: {path: /models/tiny}\ndata: {path: /data/caf\xe9.jsonl}\n")
    with pytest.raises(
        ConfigError, match=r"latin1.yaml: not UTF-8 text \(line 2, byte 50: invalid continuation"
    ):
        load_config(bad)


# About 460 bytes: each anchor in model.path is a list of ten aliases of the previous one (10**9 strings in all)
ALIAS_BOMB = "model:\n  path: [\n" + '    &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"],\n'
for _name, _prev in zip("bcdefgh", "abcdefg"):
    ALIAS_BOMB += f"    &{_name} [" + ",".join([f"*{_prev}"] * 10) + "],\n"
ALIAS_BOMB += "    [" + ",".join(["*h"] * 10) + "]]\n"


def test_nested_aliases_are_refused_quickly_and_error_values_are_bounded(tmp_path):
    import time
    import tracemalloc

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(
            ConfigError, match=r"bomb.yaml: line 5, column \d+: alias \*b names a nested collection"
        ):
            load_config(bomb)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20 << 20
    # what aliases are for still works: a shared scalar, a flat list, a merged mapping of scalars
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "defaults: &d {lr: 1e-5, seed: 3}\nmodel: {path: &p /models/tiny}\ndata: {path: *p}\n"
        "rollout: {urls: &u [http://a, http://b]}\ntrain: {<<: *d, steps: 4}\n"
    )
    with pytest.raises(ConfigError, match="unknown section 'defaults'"):
        load_config(shared)
    shared.write_text(
        shared.read_text().replace("defaults: &d", "train: &d").replace("train: {<<", "eval: {<<")
    )
    with pytest.raises(ConfigError, match="unknown key 'eval.lr'"):
        load_config(shared)
    # a long value is shown with its ends, never in full
    with pytest.raises(
        ConfigError, match=r"'model.path': expected a string, got \['x', 'x', 'x', 'x', \.\.\.\]"
    ) as err:
        load_config(None, ["model.path=[" + ",".join(["x"] * 10_000) + "]", "data.path=d"])
    assert len(str(err.value)) < 200
    with pytest.raises(ConfigError, match=r"'staleness.mode': 'aaaa.*\.\.\..*aaa' is not one of") as err:
        load_config(None, ["staleness.mode=" + "a" * 100_000, "model.path=m", "data.path=d"])
    assert len(str(err.value)) < 300
