"""Each loss builds itself from the `algorithm` config: what it receives matches docs/algorithms.md's table,
every config key reaches exactly the losses its help names, config's choice lists are the algorithms' own,
and the trainer's pre-pass is asked of the loss."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing

import pytest
import torch

from megatron_m2po.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    LOSSES,
    CurrentLogprobs,
    PolicyLoss,
    aggregate,
    compute_advantages,
    compute_m2_threshold,
    get_loss,
)
from megatron_m2po.algorithms.hyperparameters import bounds, choices
from megatron_m2po.config import AlgorithmConfig, Config, choices_of, load_config, reference_markdown
from tests.conftest import REPO

ALGORITHM_HINTS = typing.get_type_hints(AlgorithmConfig)
# a valid non-default value for every key a loss reads (a new such key must be added here)
OVERRIDES = {
    "m2_budget": 0.05,
    "m2_scope": "per_microbatch",
    "miniclip_low": 0.3,
    "miniclip_high": 0.5,
    "clip_eps": 0.1,
    "clip_eps_high": 0.3,
    "dual_clip": 3.0,
    "tis_ratio_cap": 3.0,
    "behavior_weight_cap": 4.0,
}


def documented() -> dict[str, tuple[dict, list[str]]]:
    """docs/algorithms.md's loss table: name -> ({hyperparameter: default}, [algorithm.* keys it reads])."""
    rows = {}
    for line in (REPO / "docs" / "algorithms.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]) and cells[0] != "`name`":
            defaults = {k: ast.literal_eval(v) for k, v in re.findall(r"`(\w+)=([^`]+)`", cells[2])}
            rows[cells[0].strip("`")] = (defaults, re.findall(r"`(\w+)`", cells[3]))
    return rows


def built(**algorithm) -> dict[str, PolicyLoss]:
    return {name: PolicyLoss.from_config(AlgorithmConfig(loss=name, **algorithm)) for name in LOSSES}


def readers(help_text: str) -> set[str] | None:
    """The losses a key's help names (`grpo / cispo: ...`), or None for a key of every loss."""
    m = re.match(r"([a-z0-9_]+(?: / [a-z0-9_]+)*): ", help_text)
    names = set(m.group(1).split(" / ")) if m else set()
    return names if names and names <= set(LOSSES) else None


def test_the_docs_table_lists_every_loss():
    assert set(documented()) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_default_config_gives_each_loss_its_documented_defaults(name):
    defaults, _ = documented()[name]
    aggregation = defaults.pop("aggregation", "token-mean")
    loss = PolicyLoss.from_config(AlgorithmConfig(loss=name))
    assert loss.hyperparameters == defaults
    assert loss.aggregation == aggregation
    assert loss.corrections == ()
    library = get_loss(name)  # the library's defaults are the documented ones too
    assert (library.hyperparameters, library.aggregation) == (defaults, aggregation)


def test_each_key_reaches_exactly_the_losses_its_help_and_the_docs_name():
    fields = {f.name: f.metadata["help"] for f in dataclasses.fields(AlgorithmConfig)}
    assert {k for k, h in fields.items() if readers(h)} == set(OVERRIDES)
    base = built()
    docs = documented()
    for key, value in OVERRIDES.items():
        changed = {
            name: {k: v for k, v in loss.hyperparameters.items() if v != base[name].hyperparameters[k]}
            for name, loss in built(**{key: value}).items()
        }
        reached = {name for name, diff in changed.items() if diff}
        assert reached == readers(fields[key]), key
        assert reached == {name for name, (_, keys) in docs.items() if key in keys}, key
        for name in reached:
            assert value in changed[name].values(), (key, name, changed[name])


def test_overrides_reach_the_loss():
    got = built(
        clip_eps=0.1,
        clip_eps_high=0.3,
        dual_clip=3.0,
        tis_ratio_cap=3.0,
        behavior_weight_cap=4.0,
        m2_budget=0.05,
    )
    assert got["gspo"].hyperparameters == {"clip_eps": 0.1, "clip_eps_high": 0.3}
    assert got["cispo"].hyperparameters == {"clip_eps": 0.1, "clip_eps_high": 0.3}
    assert got["grpo"].hyperparameters == {"clip_eps": 0.1, "clip_eps_high": 0.3, "dual_clip": 3.0}
    assert got["decoupled_ppo"].hyperparameters == {
        "clip_eps": 0.1,
        "clip_eps_high": 0.3,
        "behavior_weight_cap": 4.0,
    }
    assert got["tis"].hyperparameters == {"tis_ratio_cap": 3.0}
    assert got["m2po"].hyperparameters == {"m2_budget": 0.05, "m2_scope": "global"}


def test_recipes_keep_token_mean_for_m2po_and_give_a_gspo_baseline_its_own():
    paper = REPO / "examples" / "qwen2.5_math_7b" / "paper_s256.yaml"
    assert PolicyLoss.from_config(load_config(paper).algorithm).aggregation == "token-mean"
    gspo = PolicyLoss.from_config(load_config(paper, ["algorithm.loss=gspo"]).algorithm)
    assert (gspo.aggregation, gspo.hyperparameters) == (
        "seq-mean-token-mean",
        {"clip_eps": 3e-4, "clip_eps_high": 4e-4},
    )


def test_aggregation_and_rollout_corrections_reach_every_loss():
    algorithm = AlgorithmConfig(
        aggregation="seq-mean-token-sum",
        rollout_corrections=["token_tis", "icepop"],
        engine_mismatch_tis_cap=1.5,
        icepop_high=4.0,
    )
    for name in LOSSES:
        algorithm.loss = name
        loss = PolicyLoss.from_config(algorithm, "trainer")
        assert (loss.aggregation, loss.corrections, loss.correction_settings, loss.needs_engine_logprobs) == (
            "seq-mean-token-sum",
            ("token_tis", "icepop"),
            {"engine_mismatch_tis_cap": 1.5, "icepop_high": 4.0},
            True,
        )
    assert all(not loss.needs_engine_logprobs for loss in built().values())


def test_the_config_reference_in_docs_has_the_algorithm_keys_as_generated():
    generated = reference_markdown()
    section = generated[generated.index("### `algorithm`") : generated.index("### `staleness`")]
    assert section in (REPO / "docs" / "training.md").read_text()


def test_config_choices_are_the_algorithms_own():
    assert set(choices_of(ALGORITHM_HINTS["loss"])) == set(LOSSES)
    assert set(choices_of(ALGORITHM_HINTS["aggregation"])) == {"auto", *AGGREGATIONS}
    assert set(choices_of(ALGORITHM_HINTS["advantage"])) == set(ADVANTAGE_ESTIMATORS)
    assert choices_of(typing.get_type_hints(compute_advantages)["estimator"]) == ADVANTAGE_ESTIMATORS
    for name in ADVANTAGE_ESTIMATORS:  # each advertised estimator runs
        compute_advantages(torch.tensor([0.0, 1.0]), [0, 0], estimator=name)
    assert Config().algorithm.loss in LOSSES


def test_each_offered_aggregation_reduces_as_documented():
    """A value the config offers for `algorithm.aggregation` is checked against its definition here (a new
    one must bring its definition), not only against the list it comes from."""
    g = torch.Generator().manual_seed(3)
    per_token = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    kept = torch.where(mask, per_token, 0.0)
    lengths = mask.sum(-1)
    nonempty = lengths > 0
    defined = {  # docs/algorithms.md, "Common options of every loss"
        "token-mean": (kept.sum() / mask.sum(), int(mask.sum())),
        "seq-mean-token-mean": ((kept.sum(-1) / lengths.clamp(min=1))[nonempty].mean(), int(nonempty.sum())),
        "seq-mean-token-sum": (kept.sum(-1)[nonempty].mean(), int(nonempty.sum())),
    }
    assert set(choices_of(ALGORITHM_HINTS["aggregation"])) - {"auto"} == set(defined)
    for mode, (value, count) in defined.items():
        loss = PolicyLoss.from_config(AlgorithmConfig(loss="grpo_noclip", aggregation=mode))
        assert loss.aggregation == mode
        torch.testing.assert_close(aggregate(per_token, mask, mode), value)
        assert loss.normalizer_count(lengths.tolist()) == count  # what the trainer divides by
        torch.testing.assert_close(aggregate(per_token, mask, mode, normalizer=count), value)
    with pytest.raises(ValueError, match="aggregate: mode must be one of"):
        aggregate(per_token, mask, "seq-sum")


def test_each_offered_m2_scope_sets_where_the_threshold_comes_from():
    """Each `algorithm.m2_scope` the config offers has its own behaviour: `global` takes the threshold of the
    whole mini-batch before the update (the trainer's pre-pass), `per_microbatch` its own call's."""
    current = _minibatch()
    whole = compute_m2_threshold(
        current.logprobs, current.behavior_logprobs, current.advantages, current.response_mask, m2_budget=0.01
    )
    first = [t[0] for t in (current.logprobs, current.behavior_logprobs, current.advantages)]
    own = compute_m2_threshold(*first, current.response_mask[0], m2_budget=0.01)
    assert own != whole  # the two scopes are told apart on this mini-batch
    expected = {"global": (True, whole), "per_microbatch": (False, own)}
    assert set(choices_of(ALGORITHM_HINTS["m2_scope"])) == set(expected)
    for scope, (pre_pass, theta) in expected.items():
        loss = PolicyLoss.from_config(AlgorithmConfig(loss="m2po", m2_scope=scope, m2_budget=0.01))
        assert loss.needs_current_logprobs is pre_pass, scope
        extra = loss.inputs_before_update(current)[0] if pre_pass else {}
        _, metrics = loss(*first, current.response_mask[0], **extra)
        assert metrics["loss/m2_threshold"] == pytest.approx(min(theta, 1e30)), scope


def test_a_loss_reads_the_config_keys_named_as_its_keyword_parameters():
    """The registry knows what each loss reads from its signature: every keyword parameter is the config key
    of that name, its help names the loss, its bounds and choices are the signature's, and the config's
    default is null (the loss's own default is in its signature only)."""
    fields = {f.name: f for f in dataclasses.fields(AlgorithmConfig)}
    read = set()
    for name, spec in LOSSES.items():
        for key, parameter in spec.hyperparameters.items():
            read.add(key)
            assert key in fields, f"{name} takes {key}, which is no algorithm.* key"
            f = fields[key]
            assert name in readers(f.metadata["help"]), (name, key)
            assert f.default is None, key
            config_bounds = {b: f.metadata[b] for b in ("gt", "ge", "lt", "le") if f.metadata[b] is not None}
            assert config_bounds == bounds(parameter.annotation), key
            assert choices_of(ALGORITHM_HINTS[key]) == choices(parameter.annotation), key
    assert read == {k for k, f in fields.items() if readers(f.metadata["help"])}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_hyperparameter_value_is_checked_against_its_signature(name):
    """No list of names to keep up to date: each keyword parameter of each loss refuses what its annotation
    does not allow, naming itself."""
    for key, parameter in LOSSES[name].hyperparameters.items():
        allowed = choices(parameter.annotation)
        bad = ["not-a-choice"] if allowed else [float("nan"), float("inf"), -1.0, "0.1"]
        for value in bad:
            with pytest.raises(ValueError, match=rf"get_loss\('{name}'\): {key} must be"):
                get_loss(name, **{key: value})
    for key in ("aggregation", "engine_mismatch_tis_cap", "icepop_low", "nonfinite"):  # common keywords
        with pytest.raises(ValueError, match=rf"get_loss\('{name}'\): {key} must be"):
            get_loss(name, **{key: -1.0})


def _minibatch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    micro = []
    for _ in range(2):
        lp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
        blp = lp - torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5
        adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 5).contiguous()
        mask = torch.rand(3, 5, generator=g) < 0.8
        micro.append((lp, blp, adv, mask))
    return CurrentLogprobs(*[[m[i] for m in micro] for i in range(4)])


def test_the_loss_says_what_it_needs_before_the_update():
    needs = {name: loss.needs_current_logprobs for name, loss in built().items()}
    assert {name for name, need in needs.items() if need} == {"m2po", "decoupled_ppo"}
    assert not PolicyLoss.from_config(
        AlgorithmConfig(loss="m2po", m2_scope="per_microbatch")
    ).needs_current_logprobs
    with pytest.raises(ValueError, match="needs no current log-probs"):
        get_loss("grpo").inputs_before_update(_minibatch())

    current = _minibatch()
    m2po = get_loss("m2po", m2_budget=0.01)
    theta = compute_m2_threshold(
        current.logprobs,
        current.behavior_logprobs,
        current.advantages,
        current.response_mask,
        m2_budget=0.01,
    )
    assert m2po.inputs_before_update(current) == [{"m2_threshold": theta}] * 2
    assert theta < float("inf")  # the mask is exercised
    proximal = get_loss("decoupled_ppo").inputs_before_update(current)
    assert all(p["proximal_logprobs"] is lp for p, lp in zip(proximal, current.logprobs))
