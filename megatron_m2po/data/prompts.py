"""Prompt sets -> tokenized prompts with their gold answers.

A set is a local .jsonl / .parquet file, a benchmark shipped with the package (`from_benchmark`), or any
other name, which the `datasets` library loads: a Hugging Face Hub dataset such as
`BytedTsinghua-SIA/DAPO-Math-17k` where the network allows, or a local dataset folder. Sets name their
fields differently (problem/question, answer/final_answer, the answer boxed inside `solution`, GSM8K's
`#### 42`, nested `reward_model.ground_truth`), so the field names and how the answer is read are
options. Every bad row is an error naming the set and row, or is skipped and counted with
`on_error="skip"`; over-long prompts are filtered and counted, never dropped silently. A problem over
`max_prompt_chars` characters is refused (and counted) before it reaches the tokenizer, whose time and
memory grow with the text.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_m2po.data.answers import extract_last_boxed
from megatron_m2po.data.benchmarks import get_benchmark

logger = logging.getLogger(__name__)

# The prompt of the M2PO paper (arXiv 2510.01161; docs/rollout.md, "template"); the chat template goes on top.
M2PO_TEMPLATE = (
    "Please solve the following math problem: {problem}. The assistant first thinks about the reasoning "
    "process step by step and then provides the user with the answer. Return the final answer in \\boxed{{}} "
    "tags, for example \\boxed{{1}}. Let's solve this step by step."
)
TEMPLATES: dict[str, str] = {"plain": "{problem}", "m2po": M2PO_TEMPLATE}

# How each answer field is read: "plain" as is (lists joined with ", "), "boxed" the last \boxed{} of the
# field (Minerva keeps its answer in `solution`), "gsm8k" the text after "####".
ANSWER_FORMATS = ("plain", "boxed", "gsm8k")

# Local files read without the `datasets` library (line numbers in errors); any other source goes through it.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class PromptDataError(ValueError):
    """A row of a prompt file cannot be used; the message names the file and line."""


@dataclass
class Prompt:
    prompt_id: str
    prompt_ids: list[int]
    answer: str
    text: str


def _answer_to_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC23 stores 27.0
    if isinstance(value, (list, tuple)):
        return ", ".join(_answer_to_str(v) for v in value)
    return str(value).strip()


def read_answer(value: Any, answer_format: str) -> str:
    """The gold answer string of one row's answer field (raises ValueError with the reason)."""
    if answer_format == "plain":
        answer = _answer_to_str(value)
    elif answer_format == "boxed":
        boxed = extract_last_boxed(str(value))
        if boxed is None:
            raise ValueError("no \\boxed{} answer in the field")
        answer = boxed.strip()
    elif answer_format == "gsm8k":
        text = str(value)
        if "####" not in text:
            raise ValueError("no '####' answer marker in the field")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    else:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if not answer:
        raise ValueError("empty answer")
    return answer


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, parsed row or the exception it raised) for jsonl and parquet files."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # ~0.5 s, for parquet files only

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with open(path, "rb") as f:  # bytes, so a line that is not UTF-8 is reported with its number
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, PromptDataError(f"not UTF-8 text (byte {e.start} of the line: {e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except RecursionError:
                yield lineno, PromptDataError("invalid JSON: nested deeper than Python's recursion limit")
            except ValueError as e:  # malformed JSON, or an integer over Python's 4300-digit limit
                yield lineno, PromptDataError(f"invalid JSON: {e}")


def _read_dataset_rows(name: str, split: str, subset: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a set loaded by the `datasets` library: a Hub name or a local dataset folder."""
    try:
        import datasets  # optional: the [hub] extra
    except ImportError as e:
        raise ImportError(
            f"prompt set '{name}' is not a local {'/'.join(FILE_SUFFIXES)} file, so it is loaded with the "
            "`datasets` library, which is not installed: pip install 'megatron_m2po[hub]'"
        ) from e
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (no network, no such set or split)
        raise PromptDataError(
            f"prompt set '{name}' (split '{split}'{f', subset {subset!r}' if subset else ''}) is not a local "
            f"file and the `datasets` library could not load it: {type(e).__name__}: {e}. Without network, "
            f"download it where the Hub is reachable (`hf download --repo-type dataset {name} --local-dir DIR`) "
            "and point the path at DIR or at one of its .jsonl / .parquet files"
        ) from e
    yield from enumerate(dataset, start=1)


def _field(row: dict, key: str) -> Any:
    """row[key], or for a dotted key the nested value (`reward_model.ground_truth`, `prompt.0.content`)."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


class PromptDataset:
    """Tokenized prompts of one set, in a seeded order that is reshuffled every epoch.

    `path` is a local .jsonl / .parquet file, else a name for `datasets.load_dataset` (with `split` and
    `subset`). `dataset[i]` is row i (prompt_id `<file stem>:<line>`); `next_prompts(n)` walks the shuffled epochs
    and tags ids with the epoch (`<stem>:<line>@<epoch>`) so a prompt revisited in a later epoch is a new
    group for the replay queue's exactly-once acceptance. `state_dict()` saves the position.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        *,
        problem_key: str = "problem",
        answer_key: str = "answer",
        answer_format: str = "plain",
        template: str = "{problem}",
        apply_chat_template: bool = True,
        max_prompt_tokens: int | None = None,
        max_prompt_chars: int | None = None,
        on_error: str = "raise",
        seed: int = 0,
        shuffle: bool = True,
        split: str = "train",
        subset: str = "",
    ):
        self.path = Path(path)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"PromptDataset: on_error must be 'raise' or 'skip', got {on_error!r}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"PromptDataset: answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}"
            )
        template = TEMPLATES.get(template, template)
        if "{problem}" not in template:
            raise ValueError(
                f"PromptDataset: template must contain '{{problem}}' (or be one of {list(TEMPLATES)})"
            )
        local_file = self.path.is_file() or self.path.suffix in FILE_SUFFIXES
        if local_file and not self.path.is_file():
            raise FileNotFoundError(f"prompt file not found: {self.path}")
        if self.path.is_file() and self.path.suffix not in FILE_SUFFIXES:
            raise PromptDataError(
                f"{self.path}: unsupported prompt file type {self.path.suffix!r} (jsonl or parquet)"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.use_chat_template = apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.seed, self.shuffle = seed, shuffle
        self.num_skipped_malformed = 0
        self.num_filtered_too_long = 0
        self.num_refused_too_many_chars = 0
        self.max_prompt_chars = max_prompt_chars
        self._prompts: list[Prompt] = []
        where = "line" if local_file and self.path.suffix != ".parquet" else "row"
        rows = _read_rows(self.path) if local_file else _read_dataset_rows(str(path), split, subset)
        for lineno, row in rows:
            try:
                prompt = self._make_prompt(lineno, row, problem_key, answer_key, answer_format)
            except PromptDataError as e:
                if on_error == "raise":
                    raise PromptDataError(f"{self.path}:{where} {lineno}: {e}") from None
                self.num_skipped_malformed += 1
                logger.warning("skipping %s:%s %d: %s", self.path, where, lineno, e)
                continue
            if prompt is None:
                self.num_refused_too_many_chars += 1
                continue
            if max_prompt_tokens is not None and len(prompt.prompt_ids) > max_prompt_tokens:
                self.num_filtered_too_long += 1
                continue
            self._prompts.append(prompt)
        if self.num_filtered_too_long:
            logger.info(
                "%s: %d prompts longer than %s tokens filtered out",
                self.path,
                self.num_filtered_too_long,
                max_prompt_tokens,
            )
        if self.num_refused_too_many_chars:
            logger.warning(
                "%s: %d rows with a problem longer than %d characters refused before tokenizing "
                "(data.max_prompt_chars)",
                self.path,
                self.num_refused_too_many_chars,
                max_prompt_chars,
            )
        if not self._prompts:
            raise PromptDataError(
                f"{self.path}: no usable prompts (skipped {self.num_skipped_malformed} malformed, "
                f"{self.num_filtered_too_long} too long, {self.num_refused_too_many_chars} over "
                f"{max_prompt_chars} characters)"
            )
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_benchmark(cls, name: str, tokenizer, **kwargs) -> PromptDataset:
        """A benchmark shipped with the package (math500, gsm8k, ...: `data.benchmarks`), read with its fields."""
        benchmark = get_benchmark(name)
        return cls(benchmark.path, tokenizer, **{**benchmark.fields, **kwargs})

    def _make_prompt(
        self, lineno: int, row: Any, problem_key: str, answer_key: str, answer_format: str
    ) -> Prompt | None:
        """The row's prompt, tokenized; None when its problem is over `max_prompt_chars` (not tokenized:
        a tokenizer takes minutes and gigabytes on a line of tens of megabytes)."""
        if isinstance(row, PromptDataError):
            raise row
        if isinstance(row, Exception):
            raise PromptDataError(f"invalid JSON: {row}")
        if not isinstance(row, dict):
            raise PromptDataError(f"expected a JSON object, got {type(row).__name__}")
        problem, answer_field = _field(row, problem_key), _field(row, answer_key)
        for key, value in ((problem_key, problem), (answer_key, answer_field)):
            if value is None:
                raise PromptDataError(f"missing field {key!r} (row has {sorted(row)})")
        if not isinstance(problem, str) or not problem.strip():
            raise PromptDataError(f"field {problem_key!r} must be a non-empty string")
        if self.max_prompt_chars is not None and len(problem) > self.max_prompt_chars:
            return None
        try:
            answer = read_answer(answer_field, answer_format)
        except ValueError as e:
            raise PromptDataError(f"field {answer_key!r}: {e}") from None
        for key, text in ((problem_key, problem), (answer_key, answer)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape: no tokenizer or engine takes it
                raise PromptDataError(
                    f"field {key!r}: a lone surrogate {text[e.start]!r} at character {e.start} is not text"
                ) from None
        text = self.template.format(problem=problem.strip())
        return Prompt(f"{self.path.stem}:{lineno}", self.tokenize(text), answer, text)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a user message, with the tokenizer's chat template when it has one."""
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self._prompts[i]

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_prompts(self, n: int) -> list[Prompt]:
        """The next n prompts of the shuffled stream (crossing epochs), ids tagged with the epoch."""
        out = []
        for _ in range(n):
            if self._position >= len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
            p = self._prompts[self._order[self._position]]
            self._position += 1
            out.append(Prompt(f"{p.prompt_id}@{self._epoch}", p.prompt_ids, p.answer, p.text))
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "size": len(self._prompts),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size", len(self._prompts)) != len(self._prompts):
            raise ValueError(
                f"{self.path}: data state is for {state['size']} prompts, the file has {len(self._prompts)}"
            )
        self.seed = state.get("seed", self.seed)
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self._epoch)

    def metrics(self) -> dict[str, float]:
        return {
            "data/prompts": float(len(self._prompts)),
            "data/skipped_malformed": float(self.num_skipped_malformed),
            "data/filtered_too_long": float(self.num_filtered_too_long),
            "data/refused_too_many_chars": float(self.num_refused_too_many_chars),
            "data/epoch": float(self._epoch),
        }
