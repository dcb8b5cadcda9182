"""`m2po evaluate` (commands/evaluate.py, rollout/evaluation.py): pass@k / avg@k math, and end-to-end runs on real benchmark files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_m2po.commands.evaluate import format_table
from megatron_m2po.data.benchmarks import get_benchmark
from megatron_m2po.rollout.evaluation import FileSpec, evaluate, pass_at_k, summarize
from megatron_m2po.types import SamplingParams

torch.set_num_threads(1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample(nck):
    n, c, k = nck
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_summarize_on_a_known_matrix():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    m = summarize([[bool(x) for x in row] for row in correct], ks=[1, 2, 4])
    assert m["avg@4"] == pytest.approx(5 / 12)
    assert m["pass@1"] == pytest.approx(5 / 12)
    # prompt 0: 1 - C(3,2)/C(4,2) = 1/2; prompt 1: 1; prompt 2: 0
    assert m["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["num_prompts"] == 3


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=6)
    )
)
def test_pass_at_1_equals_avg_and_pass_at_k_grows_with_k(rows):
    n = len(rows[0])
    m = summarize(rows, ks=range(1, n + 1))
    assert m["pass@1"] == pytest.approx(m[f"avg@{n}"])
    values = [m[f"pass@{k}"] for k in range(1, n + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(sum(any(r) for r in rows) / len(rows))


def test_bad_inputs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="same number"):
        summarize([[True, False], [True]], ks=[1])
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        summarize([[True, False]], ks=[4])
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate("/nonexistent/model", [])
    with pytest.raises(ValueError, match=r"k=\[8\]"):
        evaluate("/nonexistent/model", [], responses_per_prompt=4, pass_ks=[1, 8])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    return make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "model")


BENCHMARKS = ["math500", "aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k"]


def test_end_to_end_on_the_shipped_benchmarks_by_name(tiny_model, tmp_path):
    from megatron_m2po.commands.m2po import main

    out = tmp_path / "eval.json"
    rc = main(
        [
            "evaluate",
            str(tiny_model),
            "--benchmark",
            *BENCHMARKS,
            "--max-prompts",
            "2",
            "-k",
            "2",
            "--max-new-tokens",
            "6",
            "--template",
            "plain",
            "--reward-workers",
            "1",
            "--output",
            str(out),
            "--keep-responses",
        ]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["responses_per_prompt"] == 2 and payload["sampling"]["temperature"] == 1.0
    results = {r["name"]: r for r in payload["results"]}
    assert list(results) == BENCHMARKS
    for r in results.values():
        m = r["metrics"]
        assert m["num_prompts"] == 2
        assert {"avg@2", "pass@1", "pass@2"} <= set(m)
        assert all(0.0 <= m[k] <= 1.0 for k in ("avg@2", "pass@1", "pass@2"))
        assert m["pass@1"] == pytest.approx(m["avg@2"])
        assert all(len(x["responses"]) == 2 and len(x["correct"]) == 2 for x in r["responses"])
    # the field mapping reached the scorer: GSM8K's gold answer is the text after '####',
    # Minerva's the last \boxed{} of its solution, OlympiadBench's the final_answer list
    first = {name: json.loads(get_benchmark(name).path.open().readline()) for name in BENCHMARKS}
    assert results["gsm8k"]["responses"][0]["answer"] == first["gsm8k"]["answer"].split("####")[
        -1
    ].strip().replace(",", "")
    assert results["minerva_math"]["responses"][0]["answer"] in first["minerva_math"]["solution"]
    assert results["olympiadbench"]["responses"][0]["answer"] == ", ".join(
        first["olympiadbench"]["final_answer"]
    )


def test_evaluate_without_a_set_names_the_options(tiny_model):
    from megatron_m2po.commands.m2po import main

    with pytest.raises(SystemExit, match=r"--benchmark \(math500, aime24, .*\) and/or --data FILE"):
        main(["evaluate", str(tiny_model)])
    with pytest.raises(SystemExit):  # argparse: an unknown benchmark name lists the choices
        main(["evaluate", str(tiny_model), "--benchmark", "math5000"])


def test_megatron_checkpoint_scores_like_its_hf_source(tiny_model, tmp_path):
    """A Megatron checkpoint dir is converted back to HF and served: greedy answers equal the HF dir's."""
    from megatron_m2po import platform
    from megatron_m2po.checkpoint.convert import convert_hf_to_megatron

    convert_hf_to_megatron(tiny_model, tmp_path / "megatron")
    platform.destroy_distributed()
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    spec = [FileSpec.benchmark("gsm8k")]
    kwargs = dict(sampling=greedy, max_prompts=3, template="plain", keep_responses=True)
    hf = evaluate(tiny_model, spec, **kwargs)[0]
    meg = evaluate(tmp_path / "megatron", spec, **kwargs)[0]
    assert [x["responses"] for x in meg.responses] == [x["responses"] for x in hf.responses]
    assert meg.metrics == pytest.approx(hf.metrics)
    table = format_table([hf, meg])
    assert table.splitlines()[0].startswith("| file") and "gsm8k" in table and "mean" in table


def test_custom_field_mapping_and_errors_name_the_file(tiny_model, tmp_path):
    rows = [{"q": "1+1", "sol": "so \\boxed{2}"}, {"q": "2+2", "sol": "\\boxed{4}"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(
        tiny_model,
        [FileSpec(path, "q", "sol", "boxed")],
        max_prompts=0,
        template="plain",
        sampling=SamplingParams(max_new_tokens=4, temperature=0.0),
        keep_responses=True,
    )[0]
    assert [x["answer"] for x in res.responses] == ["2", "4"]
    assert math.isfinite(res.metrics["avg@1"])
    with pytest.raises(Exception, match=r"mine\.jsonl.*line 1.*'problem'"):
        evaluate(tiny_model, [FileSpec(path)], template="plain", sampling=SamplingParams(max_new_tokens=2))


def test_the_engines_are_built_as_the_trainers(monkeypatch):
    """`m2po evaluate --engine sglang` builds its clients with the trainer's own builder: a router URL takes
    generation while /server_info goes to each server behind it, and the API key comes from M2PO_API_KEY."""
    from megatron_m2po.rollout.evaluation import build_engine

    monkeypatch.setenv("M2PO_API_KEY", "eval-key")
    servers = ["http://10.0.0.1:30000", "http://10.0.0.2:30000/"]
    farm = build_engine("sglang", Path("unused"), urls=servers, router_url="http://10.0.0.9:30000")
    (router,) = farm.engines
    assert router.url == "http://10.0.0.9:30000"
    assert router.worker_urls == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    assert router._auth_header("/generate") == {"Authorization": "Bearer eval-key"}
    direct = build_engine("sglang", Path("unused"), urls=servers)
    assert [e.url for e in direct.engines] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    with pytest.raises(ValueError, match="needs --url: the SGLang servers"):
        build_engine("sglang", Path("unused"), router_url="http://10.0.0.9:30000")
    with pytest.raises(ValueError, match="--router-url is for --engine sglang"):
        build_engine("vllm", Path("unused"), urls=servers, router_url="http://10.0.0.9:30000")
    with pytest.raises(ValueError, match="unknown engine 'trtllm'"):
        build_engine("trtllm", Path("unused"))
