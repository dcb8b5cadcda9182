"""The benchmark test sets shipped with the package, by name (`m2po evaluate --benchmark math500`).

Each set is a JSONL file beside this module (README.md there gives its source and licence); the table
below says which row fields hold the problem and the answer, and how the answer is read, so a set is
opened by its name alone. The names are `choices.BenchmarkName`, which the config validates against.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path

from megatron_m2po.choices import BenchmarkName


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    problem_key: str
    answer_key: str
    answer_format: str  # data.prompts.ANSWER_FORMATS

    @property
    def path(self) -> Path:
        return Path(__file__).with_name(f"{self.name}.jsonl")

    @property
    def fields(self) -> dict[str, str]:
        """The `PromptDataset` keyword arguments that read this set's rows."""
        return {
            "problem_key": self.problem_key,
            "answer_key": self.answer_key,
            "answer_format": self.answer_format,
        }


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", "MATH-500", "problem", "answer", "plain"),
        Benchmark("aime24", "AIME 2024", "problem", "answer", "plain"),
        Benchmark("amc23", "AMC 2023", "problem", "answer", "plain"),
        Benchmark("gsm8k", "GSM8K test", "question", "answer", "gsm8k"),
        Benchmark("minerva_math", "Minerva Math", "problem", "solution", "boxed"),
        Benchmark("olympiadbench", "OlympiadBench", "question", "final_answer", "plain"),
    )
}
if set(BENCHMARKS) != set(typing.get_args(BenchmarkName)):
    raise ImportError(f"shipped benchmarks {sorted(BENCHMARKS)} differ from choices.BenchmarkName")


def get_benchmark(name: str) -> Benchmark:
    """The shipped set called `name`; an unknown name is an error listing the sets (and the closest one)."""
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"no shipped benchmark '{name}' (shipped: {', '.join(BENCHMARKS)}){hint}")
    return BENCHMARKS[name]
