"""The package's import layers: every import in megatron_m2po/ (inside functions too) goes down the layers.

A part of the package (a subpackage or a top-level module) may import its own modules, and parts of a lower
layer; never a higher layer, never the commands from the library, never in a cycle. An import inside a
function (of any module) needs its reason on the same line (a heavy or optional dependency that most callers
never load), since such imports hide cycles from a reader. `if TYPE_CHECKING:` imports are exempt (they
never run).

Adding a part: put it in LAYERS at the lowest layer whose parts it needs, and in README's "Layout" table.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_m2po"

# layer -> the parts in it; a part is a subpackage or a top-level module of megatron_m2po.
LAYERS: dict[int, tuple[str, ...]] = {
    1: ("types", "choices", "staleness", "io_errors", "console", "platform", "net", "event_loop", "trackers"),
    2: ("config",),
    3: ("models", "metrics"),
    4: ("checkpoint", "algorithms", "queue", "data"),
    5: ("sync",),
    6: ("rollout",),
    7: ("trainer",),
    8: ("train",),
    9: ("commands",),
    10: ("__main__",),
}
COMMANDS = "commands"
ENTRY_POINTS = ("commands", "__main__")  # the parts that may import the commands


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the package's parent
    line: int
    source: str  # the importing part
    target: str  # the imported part ("" for the package itself)
    text: str  # the source line


def part_of(module: str) -> str:
    """`megatron_m2po.rollout.farm` -> "rollout"; `megatron_m2po` -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            exempt.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return exempt


def _function_imports(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def imports(root: Path) -> Iterator[Import]:
    """Every import of the package's own modules under `root` (the package directory)."""
    package = root.name
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        source_lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(source_lines), filename=str(path))
        exempt = _type_checking_blocks(tree)
        for node in ast.walk(tree):
            if id(node) in exempt:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    base = module.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    absolute = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    absolute = node.module or ""
                if absolute == package:  # `from megatron_m2po import console, platform`
                    targets = [f"{package}.{a.name}" for a in node.names]
                else:
                    targets = [absolute]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    yield Import(
                        path.relative_to(root.parent),
                        node.lineno,
                        part_of(module),
                        part_of(target),
                        source_lines[node.lineno - 1].strip(),
                    )


def unexplained_function_imports(root: Path) -> Iterator[str]:
    """`path:line: text` of every import inside a function without a comment giving its reason."""
    for path in sorted(root.rglob("*.py")):
        source_lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(source_lines), filename=str(path))
        exempt, in_function = _type_checking_blocks(tree), _function_imports(tree)
        for node in ast.walk(tree):
            if id(node) in in_function and id(node) not in exempt:
                text = source_lines[node.lineno - 1].strip()
                if "#" not in text:
                    yield f"{path.relative_to(root.parent)}:{node.lineno}: {text}"


def _layer_of(layers: dict[int, tuple[str, ...]]) -> dict[str, int]:
    return {part: layer for layer, parts in layers.items() for part in parts}


def _cycles(edges: dict[tuple[str, str], Import]) -> list[list[str]]:
    """The strongly connected components of more than one part (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(root: Path, layers: dict[int, tuple[str, ...]] = LAYERS) -> list[str]:
    """Every breach of the layering under `root`, one line each naming the file and line."""
    layer_of = _layer_of(layers)
    out: list[str] = []
    edges: dict[tuple[str, str], Import] = {}
    parts_seen = {
        part_of(module_name(root, p)) for p in root.rglob("*.py") if module_name(root, p) != root.name
    }
    for part in sorted(parts_seen - set(layer_of)):
        out.append(
            f"{root.name}/{part}: not in the layer table; add it to LAYERS (tests/test_import_layers.py)"
        )
    out += [
        f"{where}: an import inside a function needs its reason on the same line (a heavy or optional "
        "dependency); otherwise import at the top of the module"
        for where in unexplained_function_imports(root)
    ]
    for imp in imports(root):
        where = f"{imp.path}:{imp.line}: {imp.text}"
        if imp.source == imp.target or "" in (imp.source, imp.target):
            continue
        edges.setdefault((imp.source, imp.target), imp)
        if imp.target == COMMANDS and imp.source not in ENTRY_POINTS:
            out.append(f"{where}: the library imports the commands ({imp.source} -> {imp.target})")
            continue
        src, dst = layer_of.get(imp.source), layer_of.get(imp.target)
        if src is not None and dst is not None and dst >= src:
            out.append(
                f"{where}: {imp.source} (layer {src}) imports {imp.target} (layer {dst}); "
                "imports go down the layers only"
            )
    for component in _cycles(edges):
        links = [
            f"{a} -> {b} ({edges[a, b].path}:{edges[a, b].line})"
            for a in component
            for b in component
            if (a, b) in edges
        ]
        out.append(f"import cycle between {', '.join(component)}: " + "; ".join(links))
    return out


# ------------------------------------------------------------------------------------------ the package


def test_the_package_imports_down_the_layers_only():
    assert problems(REPO / PACKAGE) == []


def test_every_part_is_in_the_readme_layout_table():
    """The README's layer table (what users read) names every part the test knows, in its layer."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {
        int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| ([^|]+) \|", section, re.MULTILINE)
    }
    assert sorted(rows) == sorted(LAYERS), f"README layers {sorted(rows)} != LAYERS {sorted(LAYERS)}"
    for layer, parts in LAYERS.items():
        for part in parts:
            assert re.search(rf"`{re.escape(part)}(\.py|/)`", rows[layer]), (
                f"README's Layout table, layer {layer}: `{part}` missing (row: {rows[layer]!r})"
            )


# ------------------------------------------------------------------------- the checker on planted trees


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


CLEAN = {
    "types.py": "",
    "config.py": "from megatron_m2po.types import *\n",
    "models/__init__.py": "",
    "models/builder.py": "from megatron_m2po import config, types\n",
    "checkpoint/__init__.py": "from .convert import x\n",
    "checkpoint/convert.py": "from ..models import builder\n",
    "commands/__init__.py": "",
    "commands/m2po.py": "from megatron_m2po.checkpoint import convert\n",
    "__main__.py": "from megatron_m2po.commands.m2po import main\n",
}


def test_a_clean_tree_passes(tmp_path):
    assert problems(_tree(tmp_path, CLEAN)) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            **CLEAN,
            "models/builder.py": """\
                from megatron_m2po import config


                def load():
                    from megatron_m2po.checkpoint.convert import x  # reason
                    return x
            """,
        },
    )
    found = problems(root)
    assert any(p.startswith("import cycle between checkpoint, models: ") for p in found), found
    assert any("models (layer 3) imports checkpoint (layer 4)" in p for p in found), found


def test_an_import_up_the_layers_is_found_with_its_file_and_line(tmp_path):
    root = _tree(tmp_path, {**CLEAN, "types.py": "import os\nimport megatron_m2po.config\n"})
    assert problems(root) == [
        "megatron_m2po/types.py:2: import megatron_m2po.config: types (layer 1) imports config (layer 2); "
        "imports go down the layers only",
        "import cycle between config, types: config -> types (megatron_m2po/config.py:1); "
        "types -> config (megatron_m2po/types.py:2)",
    ]


def test_the_library_importing_the_commands_is_found(tmp_path):
    root = _tree(tmp_path, {**CLEAN, "checkpoint/convert.py": "from megatron_m2po.commands import m2po\n"})
    found = problems(root)
    assert any("the library imports the commands (checkpoint -> commands)" in p for p in found), found


def test_an_unexplained_import_in_a_function_is_found(tmp_path):
    body = (
        "def f():\n    from megatron_m2po import types\n\n\nclass A:\n    def g(self):\n        import yaml\n"
    )
    found = problems(_tree(tmp_path, {**CLEAN, "config.py": body}))
    why = (
        "an import inside a function needs its reason on the same line (a heavy or optional dependency); "
        "otherwise import at the top of the module"
    )
    assert found == [
        f"megatron_m2po/config.py:2: from megatron_m2po import types: {why}",
        f"megatron_m2po/config.py:7: import yaml: {why}",
    ]
    explained = body.replace("import types\n", "import types  # pulls in a heavy optional dependency\n")
    explained = explained.replace("import yaml\n", "import yaml  # optional\n")
    assert problems(_tree(tmp_path / "b", {**CLEAN, "config.py": explained})) == []


def test_a_part_missing_from_the_table_is_found(tmp_path):
    found = problems(_tree(tmp_path, {**CLEAN, "environments/__init__.py": ""}))
    assert found == [
        f"{PACKAGE}/environments: not in the layer table; add it to LAYERS (tests/test_import_layers.py)"
    ]


def test_type_checking_imports_are_exempt(tmp_path):
    body = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_m2po.models import builder\n"
    )
    assert problems(_tree(tmp_path, {**CLEAN, "config.py": body})) == []


@pytest.mark.parametrize(
    "statement", ["from . import config", "from .config import x", "from .. import config"]
)
def test_relative_imports_resolve_to_their_part(tmp_path, statement):
    location = (
        "types.py" if statement.startswith("from . ") or statement.startswith("from .c") else "models/x.py"
    )
    files = {**CLEAN, location: statement + "\n"}
    if location == "models/x.py":  # models -> config is down: fine
        assert problems(_tree(tmp_path, files)) == []
    else:  # types -> config is up
        assert any("types (layer 1) imports config (layer 2)" in p for p in problems(_tree(tmp_path, files)))
