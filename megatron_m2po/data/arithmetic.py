"""A synthetic arithmetic task for the CPU demo: generated from a seed, never downloaded.

Problems are sums of two integers in [0, 99] ("37+48"; differences "91-26" on request); the reference
answer is the integer, and a correct response is `\\boxed{85}`, so the same math-verify reward that
scores benchmark answers scores the demo. Problems are split into train / validation / held-out
sets that share no (question) string, so held-out accuracy measures generalisation, not recall.

Files are written as jsonl with the `problem` / `answer` fields that `PromptDataset` reads by default.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

# The user message the demo sends: the bare problem with a trailing "=", so prompts stay a few dozen
# characters for a character-level model (the paper's long template would triple every sequence).
DEMO_TEMPLATE = "{problem}="


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: `problem` is the expression ("37+48"), `answer` the exact integer result as text."""

    problem: str
    answer: str

    @property
    def target(self) -> str:
        """The response a perfect policy writes (what the supervised warm start imitates)."""
        return boxed(self.answer)


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def all_problems(max_operand: int = 99, ops: str = "+") -> list[ArithmeticProblem]:
    """Every problem of the task in a fixed order: a op b for 0 <= a, b <= max_operand; a - b only when a >= b."""
    for op in ops:
        if op not in "+-":
            raise ValueError(f"arithmetic ops: {op!r} is not supported; use '+' and/or '-'")
    if max_operand < 1:
        raise ValueError(f"arithmetic max_operand must be >= 1, got {max_operand}")
    problems = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            if "+" in ops:
                problems.append(ArithmeticProblem(f"{a}+{b}", str(a + b)))
            if "-" in ops and a >= b:
                problems.append(ArithmeticProblem(f"{a}-{b}", str(a - b)))
    return problems


def make_splits(
    *, seed: int = 0, num_heldout: int = 300, num_validation: int = 200, max_operand: int = 99, ops: str = "+"
) -> dict[str, list[ArithmeticProblem]]:
    """Shuffle every problem with `seed` and cut disjoint `heldout`, `validation` and `train` splits.

    The held-out set is what the demo reports; the validation set decides when the warm start stops,
    so the reported number never influenced training.
    """
    problems = all_problems(max_operand, ops)
    if num_heldout + num_validation >= len(problems):
        raise ValueError(
            f"arithmetic: {num_heldout} held-out + {num_validation} validation problems leave no training "
            f"problems out of {len(problems)}"
        )
    random.Random(seed).shuffle(problems)
    return {
        "heldout": problems[:num_heldout],
        "validation": problems[num_heldout : num_heldout + num_validation],
        "train": problems[num_heldout + num_validation :],
    }


def write_jsonl(problems: Iterable[ArithmeticProblem], path: str | Path) -> Path:
    """Write `{"problem": ..., "answer": ...}` rows, the default field names of `PromptDataset`.

    Written to a temporary name and renamed, so a reader (another sweep process's run reading the shared
    task files while this one rewrites them) sees the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for p in problems:
            f.write(json.dumps(asdict(p)) + "\n")
    tmp.replace(path)
    return path


def write_splits(out_dir: str | Path, splits: dict[str, list[ArithmeticProblem]]) -> dict[str, Path]:
    """Write each split to `<out_dir>/<name>.jsonl`; returns name -> path."""
    return {name: write_jsonl(problems, Path(out_dir) / f"{name}.jsonl") for name, problems in splits.items()}
