"""A synthetic arithmetic task for the CPU demo: generated from a seed, never downloaded.

Problems are sums of two integers in [0, 99] ("37+48"; differences "91-26" on request); the reference
answer is the integer, and a correct response is `\\boxed{85}`, so the same math-verify reward that
scores benchmark answers scores the demo. Problems are split into train / validation / held-out
sets that share no addition fact (`fact`): "37+48", "48+37", "85-37" and "85-48" state one fact, so a
held-out problem's twins are never trained on and held-out accuracy measures generalisation, not recall.
The split by question string alone (`split="problem"`) keeps measurements made on it reproducible.

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


# How problems are kept apart between splits: by the addition fact they state (no twins across splits),
# or by question string alone (a held-out "48+37" may have "37+48" in training).
SPLITS = ("fact", "problem")


def fact(problem: ArithmeticProblem) -> tuple[int, int]:
    """The addition fact x + y = z a problem states, as the sorted pair (x, y): every symmetry of the
    generator maps a problem to another with the same fact (a+b and b+a commute; a-b = c is the fact
    b + c = a, so (b+c)-b and (b+c)-c are twins of b+c and c+b)."""
    for op in "+-":
        left, sep, right = problem.problem.partition(op)
        if sep and left.isdigit() and right.isdigit():
            a, b = int(left), int(right)
            x, y = (a, b) if op == "+" else (b, a - b)
            return (min(x, y), max(x, y))
    raise ValueError(f"arithmetic: {problem.problem!r} is not 'a+b' or 'a-b'")


def make_splits(
    *,
    seed: int = 0,
    num_heldout: int = 300,
    num_validation: int = 200,
    max_operand: int = 99,
    ops: str = "+",
    split: str = "fact",
) -> dict[str, list[ArithmeticProblem]]:
    """Disjoint `heldout`, `validation` and `train` splits of every problem, shuffled with `seed`.

    `split="fact"`: whole facts (a problem and all its twins, `fact`) are dealt to the splits in a seeded
    order, each to the first split it still fits (held-out, then validation, then train); a gap left in
    held-out or validation is filled with lone facts (written one way only, such as 7+7), which always
    suffices when there are at least as many lone facts as held-out and validation problems (else a
    ValueError). So no held-out or validation problem has a twin in training. `split="problem"`: problems
    are shuffled and cut one by one, as measured before the split by fact existed. The held-out set is
    what the demo reports; the validation set decides when the warm start stops, so the reported number
    never influenced training.
    """
    if split not in SPLITS:
        raise ValueError(f"arithmetic split: {split!r} is not one of {SPLITS}")
    problems = all_problems(max_operand, ops)
    if num_heldout + num_validation >= len(problems):
        raise ValueError(
            f"arithmetic: {num_heldout} held-out + {num_validation} validation problems leave no training "
            f"problems out of {len(problems)}"
        )
    rng = random.Random(seed)
    if split == "problem":
        rng.shuffle(problems)
        return {
            "heldout": problems[:num_heldout],
            "validation": problems[num_heldout : num_heldout + num_validation],
            "train": problems[num_heldout + num_validation :],
        }
    groups: dict[tuple[int, int], list[ArithmeticProblem]] = {}
    for p in problems:
        groups.setdefault(fact(p), []).append(p)
    order = list(groups.values())
    rng.shuffle(order)
    sizes = {"heldout": num_heldout, "validation": num_validation, "train": len(problems)}
    dealt: dict[str, list[list[ArithmeticProblem]]] = {name: [] for name in sizes}
    for group in order:
        name = next(n for n in sizes if sum(map(len, dealt[n])) + len(group) <= sizes[n])
        dealt[name].append(group)
    for name in ("heldout", "validation"):  # a group too big for the space left: fill it with lone facts
        while sum(map(len, dealt[name])) < sizes[name]:
            single = next((g for g in dealt["train"] if len(g) == 1), None)
            if single is None:
                raise ValueError(f"arithmetic: whole facts cannot fill {sizes[name]} {name} problems exactly")
            dealt["train"].remove(single)
            dealt[name].append(single)
    splits = {name: [p for group in groups_ for p in group] for name, groups_ in dealt.items()}
    for chosen in splits.values():  # twins apart: the demo evaluates the first problems of a split
        rng.shuffle(chosen)
    return splits


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


def multiplication_splits(
    *,
    seed: int = 0,
    num_train: int = 4000,
    num_heldout: int = 200,
    num_validation: int = 100,
    left: tuple[int, int] = (100, 999),
    right: tuple[int, int] = (10, 99),
) -> dict[str, list[ArithmeticProblem]]:
    """Products "a*b" of a 3-digit and a 2-digit number (the tool demo's task: no sub-million-parameter
    model multiplies these in its head; with a Python tool it only copies the operands and the result).

    Distinct problems drawn with `seed`, dealt to `heldout`, `validation` and `train`; a left operand
    always has three digits and a right one two, so no problem has a twin (b*a) in another split."""
    count = num_train + num_heldout + num_validation
    space = (left[1] - left[0] + 1) * (right[1] - right[0] + 1)
    if count > space:
        raise ValueError(f"arithmetic: {count} multiplication problems asked, only {space} exist")
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < count:
        pairs[(rng.randint(*left), rng.randint(*right))] = None
    problems = [ArithmeticProblem(f"{a}*{b}", str(a * b)) for a, b in pairs]
    return {
        "heldout": problems[:num_heldout],
        "validation": problems[num_heldout : num_heldout + num_validation],
        "train": problems[num_heldout + num_validation :],
    }
