"""The loop's structure, checked on the source: the staleness modes differ in one module (and the queue's rule in
queue/admission.py), every call that all trainer ranks must make in the same order is named as a collective, and
train.py stays short enough to read top to bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megatron_m2po.staleness import MODES
from tests.conftest import REPO

PACKAGE = REPO / "megatron_m2po"
MODE_MODULES = {PACKAGE / "staleness.py", PACKAGE / "queue" / "admission.py"}
# where the loop's calls live: these modules' functions must name their collectives
LOOP_MODULES = [PACKAGE / "train.py", PACKAGE / "staleness.py", *sorted((PACKAGE / "trainer").glob("*.py"))]

TORCH_COLLECTIVES = {
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "recv",
    "reduce",
    "reduce_scatter",
    "scatter",
    "scatter_object_list",
    "send",
}
COLLECTIVE_PREFIXES = ("broadcast", "gather", "all_", "barrier")  # torch.distributed's own verbs
ENTRY_POINTS = {"train"}  # the loop itself: every rank runs it
# Parts of the model forward that Megatron's schedule runs on every rank of a TP / CP group inside the
# forward step (their callers, which start the schedule, carry the name): the CP gather of log-probs is
# communication of the forward, as the TP all-reduce inside vocab_parallel_logprobs is.
FORWARD_STEP = {"token_logprobs"}


def python_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in sorted(root.rglob("*.py"))]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def mode_name_branches(path: Path) -> list[str]:
    """Comparisons against a staleness mode's name (`mode == "bounded"`, `mode in ("fixed", "sync")`) and
    `case "bounded":` patterns, as 'path:line'."""

    def names_a_mode(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in MODES
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_a_mode(e) for e in node.elts)
        return False

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(names_a_mode(n) for n in [node.left, *node.comparators]):
            found.append(f"{shown(path)}:{node.lineno}")
        if isinstance(node, ast.MatchValue) and names_a_mode(node.value):
            found.append(f"{shown(path)}:{node.lineno}")
    return found


def test_no_branch_on_a_staleness_mode_name_outside_the_mode_modules():
    files = [p for p in python_files(PACKAGE, REPO / "bench", REPO / "tools") if p not in MODE_MODULES]
    found = [hit for path in files for hit in mode_name_branches(path)]
    assert not found, (
        f"branches on a staleness mode's name (ask the mode, megatron_m2po/staleness.py): {found}"
    )


def test_the_mode_name_check_finds_a_planted_branch(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('def f(cfg):\n    return cfg.staleness.mode in ("fixed", "sync")\n')
    assert mode_name_branches(planted) == ["planted.py:2"]


def is_collective_name(name: str) -> bool:
    bare = name.lstrip("_")
    return name.endswith("_collective") or bare.startswith(COLLECTIVE_PREFIXES)


def collective_calls(function: ast.AST) -> list[str]:
    """Collectives `function` calls itself (not in nested functions, which are checked on their own)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(child, ast.Call):
                callee = child.func
                name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
                base = callee.value if isinstance(callee, ast.Attribute) else None
                from_torch = isinstance(base, ast.Name) and base.id == "dist" and name in TORCH_COLLECTIVES
                megatron = (
                    isinstance(callee, ast.Call)
                    and getattr(callee.func, "id", "") == "get_forward_backward_func"
                ) or (
                    isinstance(base, ast.Name)
                    and base.id == "dist_checkpointing"
                    and name in ("save", "load")
                )
                if from_torch or megatron or (name and is_collective_name(name)):
                    found.append(name or "get_forward_backward_func()")
            visit(child)

    visit(function)
    return found


def unnamed_collectives(path: Path) -> list[str]:
    """Functions in `path` that make a collective call but are not named as collectives themselves."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name in ENTRY_POINTS | FORWARD_STEP:
            continue
        calls = collective_calls(node)
        if calls and not is_collective_name(node.name):
            out.append(f"{shown(path)}:{node.lineno} {node.name} calls {sorted(set(calls))}")
    return out


def test_every_function_of_the_loop_that_makes_a_collective_call_is_named_collective():
    found = [hit for path in LOOP_MODULES for hit in unnamed_collectives(path)]
    assert not found, "name these `..._collective` (every rank calls them in the same order):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "source",
    [
        "def save(x):\n    return broadcast_from_rank0(x)\n",
        "def push(self):\n    dist.all_reduce(t)\n",
        "def step(self):\n    self.engines.push_collective(1)\n",
        "def forward(m):\n    return get_forward_backward_func()(model=m)\n",
    ],
)
def test_the_collective_check_finds_an_unnamed_collective(tmp_path, source):
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    assert len(unnamed_collectives(planted)) == 1


def test_train_py_stays_readable_top_to_bottom():
    lines = len((PACKAGE / "train.py").read_text().splitlines())
    assert lines <= 250, f"megatron_m2po/train.py has {lines} lines: move helpers out, keep the loop in"
