"""Prompt data: field presets on the real benchmark files, templates, chat template, errors naming file and line."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_m2po.data.prompts import M2PO_TEMPLATE, PromptDataError, PromptDataset, read_answer
from megatron_m2po.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tiny_model("qwen3", tmp_path_factory.mktemp("tiny")))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "stem,rows,first_answer",
    [
        ("math500", 500, r"\left( 3, \frac{\pi}{2} \right)"),
        ("gsm8k", 1319, "18"),
        ("amc23", 40, "27"),
        ("minerva_math", 272, None),
        ("olympiadbench", 675, None),
        ("aime24", 30, None),
    ],
)
def test_shipped_benchmarks_read_every_row(tokenizer, stem, rows, first_answer):
    ds = PromptDataset.from_benchmark(stem, tokenizer)
    assert len(ds) == rows and ds.num_skipped_malformed == 0
    assert all(p.answer for p in ds)
    if first_answer is not None:
        assert ds[0].answer == first_answer


def test_answer_formats():
    assert read_answer(["3", "5"], "plain") == "3, 5"
    assert read_answer(27.0, "plain") == "27"
    assert read_answer(r"so $\boxed{\frac{1}{2}}$.", "boxed") == r"\frac{1}{2}"
    assert read_answer("work\n#### 1,234", "gsm8k") == "1234"
    with pytest.raises(ValueError, match="####"):
        read_answer("no marker", "gsm8k")


def test_chat_template_and_paper_template(tmp_path, tokenizer):
    f = _write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "answer": "2"}])
    ds = PromptDataset(f, tokenizer, template="m2po")
    assert ds[0].text == M2PO_TEMPLATE.format(problem="1+1?")
    decoded = tokenizer.decode(ds[0].prompt_ids)
    assert decoded.startswith("<|im_start|>user\nPlease solve the following math problem: 1+1?.")
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    raw = PromptDataset(f, tokenizer, apply_chat_template=False)
    assert tokenizer.decode(raw[0].prompt_ids) == "1+1?"
    assert ds[0].prompt_id == "p:1"


def test_too_long_prompts_filtered_and_counted(tmp_path, tokenizer):
    rows = [{"problem": "x" * n, "answer": "1"} for n in (5, 500, 10, 800)]
    ds = PromptDataset(
        _write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, apply_chat_template=False, max_prompt_tokens=100
    )
    assert len(ds) == 2 and ds.num_filtered_too_long == 2
    assert ds.metrics()["data/filtered_too_long"] == 2


def test_errors_name_file_and_line(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(tmp_path / "nope.jsonl", tokenizer)
    bad_json = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"problem": "a", "answer": "1"},
            "",
            '{"problem": "b", ',
        ],
    )
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:line 3: invalid JSON"):
        PromptDataset(bad_json, tokenizer)
    missing = _write_jsonl(
        tmp_path / "missing.jsonl", [{"problem": "a", "answer": "1"}, {"question": "b", "answer": "2"}]
    )
    with pytest.raises(PromptDataError, match=r"missing\.jsonl:line 2: missing field 'problem'"):
        PromptDataset(missing, tokenizer)
    boxless = _write_jsonl(tmp_path / "boxless.jsonl", [{"problem": "a", "solution": "no box"}])
    with pytest.raises(PromptDataError, match=r"boxless\.jsonl:line 1: field 'solution': no \\boxed"):
        PromptDataset(boxless, tokenizer, answer_key="solution", answer_format="boxed")


def test_non_utf8_line_is_named_by_file_and_line(tmp_path, tokenizer):
    """A Latin-1 byte on line 3 (was a bare UnicodeDecodeError with neither file nor line); skip mode counts it."""
    good = (json.dumps({"problem": "a", "answer": "1"}) + "\n").encode()
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(good + b"\n" + '{"problem": "caf\xe9", "answer": "2"}\n'.encode("latin-1") + good)
    with pytest.raises(PromptDataError, match=r"latin1\.jsonl:line 3: not UTF-8 text \(byte 16 of the line"):
        PromptDataset(f, tokenizer)
    ds = PromptDataset(f, tokenizer, on_error="skip")
    assert [p.prompt_id for p in ds] == ["latin1:1", "latin1:4"]
    assert ds.num_skipped_malformed == 1


def test_skip_mode_counts_bad_rows(tmp_path, tokenizer):
    f = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"problem": "a", "answer": "1"},
            "not json",
            [1, 2],
            {"problem": "b"},
            {"problem": "c", "answer": 3},
        ],
    )
    ds = PromptDataset(f, tokenizer, on_error="skip")
    assert [p.prompt_id for p in ds] == ["mixed:1", "mixed:5"]
    assert ds.num_skipped_malformed == 3
    assert ds[1].answer == "3"


def test_parquet_and_row_errors(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "final_answer": [["1"], ["2", "3"]]}), path)
    ds = PromptDataset(path, tokenizer, problem_key="question", answer_key="final_answer")
    assert [p.answer for p in ds] == ["1", "2, 3"]
    with pytest.raises(PromptDataError, match=r"p\.parquet:row 1: missing field 'problem'"):
        PromptDataset(path, tokenizer)


def test_epochs_are_deterministic_and_resumable(tmp_path, tokenizer):
    f = _write_jsonl(tmp_path / "p.jsonl", [{"problem": f"q{i}", "answer": str(i)} for i in range(7)])
    a = PromptDataset(f, tokenizer, seed=3)
    first = [p.prompt_id for p in a.next_prompts(10)]
    assert len(set(first)) == 10  # epoch tag keeps ids unique across epochs
    assert sorted(x.split("@")[0] for x in first[:7]) == sorted(f"p:{i}" for i in range(1, 8))
    state = a.state_dict()
    rest = [p.prompt_id for p in a.next_prompts(5)]
    b = PromptDataset(f, tokenizer, seed=3)
    assert [p.prompt_id for p in b.next_prompts(10)] == first
    c = PromptDataset(f, tokenizer, seed=3)
    c.load_state_dict(state)
    assert [p.prompt_id for p in c.next_prompts(5)] == rest


def test_a_dataset_folder_is_read_through_the_datasets_library_with_nested_fields(tmp_path, tokenizer):
    """A name that is not a local .jsonl/.parquet file goes to `datasets.load_dataset` (the Hub path); a local
    folder of parquet shards takes the same path offline. DAPO-Math-17k's layout: the problem inside a chat
    message list, the answer under reward_model."""
    folder = tmp_path / "dapo_like"
    folder.mkdir()
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{a}?"}], "reward_model": {"ground_truth": str(2 * a)}}
        for a in range(5)
    ]
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "train-00001-of-00002.parquet")
    ds = PromptDataset(
        folder,
        tokenizer,
        problem_key="prompt.0.content",
        answer_key="reward_model.ground_truth",
        shuffle=False,
    )
    assert sorted((p.text, p.answer) for p in ds) == [(f"{a}+{a}?", str(2 * a)) for a in range(5)]
    assert ds[0].prompt_id.startswith("dapo_like:")
    with pytest.raises(PromptDataError, match=r"dapo_like:row 1: missing field 'reward_model.answer'"):
        PromptDataset(folder, tokenizer, problem_key="prompt.0.content", answer_key="reward_model.answer")
    with pytest.raises(PromptDataError, match=r"split 'test'.*could not load it.*Unknown split"):
        PromptDataset(folder, tokenizer, problem_key="prompt.0.content", split="test")


def test_a_hub_name_without_network_is_a_clear_error(tmp_path):
    """No network (HF_HUB_OFFLINE, as on a cluster without Hub access): the error names the set, says the
    `datasets` library could not load it, and says how to use a downloaded copy."""
    from tests.conftest import REPO, subprocess_env

    probe = (
        "from megatron_m2po.data.prompts import PromptDataset\n"
        "PromptDataset('BytedTsinghua-SIA/DAPO-Math-17k', tokenizer=None)\n"
    )
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "megatron_m2po.data.prompts.PromptDataError: prompt set 'BytedTsinghua-SIA/DAPO-Math-17k'"
    )
    assert "could not load it" in last and "hf download --repo-type dataset" in last


def test_hostile_json_rows_are_named_by_file_and_line(tmp_path, tokenizer):
    good = json.dumps({"problem": "a", "answer": "1"})
    cases = {
        "nested": ('{"problem": "a", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
        "bigint": ('{"problem": "a", "answer": ' + "7" * 5000 + "}", "Exceeds the limit \\(4300 digits\\)"),
        "surrogate": (
            '{"problem": "x \\ud800 y", "answer": "1"}',
            "field 'problem': a lone surrogate '\\\\ud800' at character 2",
        ),
        "surrogate_answer": ('{"problem": "x", "answer": "\\udfff"}', "field 'answer': a lone surrogate"),
    }
    for name, (line, message) in cases.items():
        f = _write_jsonl(tmp_path / f"{name}.jsonl", [good, line, good])
        with pytest.raises(PromptDataError, match=rf"{name}\.jsonl:line 2: .*{message}"):
            PromptDataset(f, tokenizer)
        ds = PromptDataset(f, tokenizer, on_error="skip")
        assert [p.prompt_id for p in ds] == [f"{name}:1", f"{name}:3"] and ds.num_skipped_malformed == 1


def test_a_huge_prompt_line_is_refused_before_tokenizing_in_bounded_time_and_memory(
    tmp_path, tokenizer, caplog
):
    import logging
    import time
    import tracemalloc

    f = tmp_path / "huge.jsonl"
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    f.write_text(
        good + "\n" + json.dumps({"problem": "9 + " * 5_000_000, "answer": "1"}) + "\n" + good + "\n"
    )
    assert f.stat().st_size > 20e6
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING):
            ds = PromptDataset(f, tokenizer, max_prompt_tokens=100, max_prompt_chars=10_000)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    assert seconds < 5 and peak < 200e6, (seconds, peak)  # unbounded: minutes and gigabytes in the tokenizer
    assert len(ds) == 2 and ds.num_refused_too_many_chars == 1 and ds.num_filtered_too_long == 0
    assert ds.metrics()["data/refused_too_many_chars"] == 1
    assert (
        "huge.jsonl: 1 rows with a problem longer than 10000 characters refused before tokenizing"
        in caplog.text
    )
    f.write_text(json.dumps({"problem": "x" * 20, "answer": "1"}) + "\n")
    with pytest.raises(PromptDataError, match=r"no usable prompts .* 1 over 10 characters"):
        PromptDataset(f, tokenizer, max_prompt_chars=10)
