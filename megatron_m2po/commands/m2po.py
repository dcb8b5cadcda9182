"""The `m2po` console script (also `python -m megatron_m2po`): one sub-command per user task, each in its own module."""

from __future__ import annotations

import argparse
import importlib

from megatron_m2po import console

# name -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "megatron_m2po.commands.demo",
        "tiny CPU demo: warm-start a tiny model, then M2PO RL; prints accuracy before -> after",
    ),
    "train": (
        "megatron_m2po.commands.train",
        "train from a YAML recipe (under torchrun: torchrun ... -m megatron_m2po train ...)",
    ),
    "plot": ("megatron_m2po.commands.plot", "write a PNG of the main curves of a run directory"),
    "evaluate": (
        "megatron_m2po.commands.evaluate",
        "accuracy of a checkpoint on the shipped benchmarks (by name) or your own files",
    ),
    "engines": (
        "megatron_m2po.commands.engines",
        "start a node's SGLang (or CPU local) engine servers",
    ),
}

# Commands whose console hides other libraries' known noise unless --verbose (megatron_m2po/console.py).
VERBOSE_COMMANDS = ("demo", "train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2po", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, add_help=False
        )  # the sub-command's own parser prints its help
        p.set_defaults(_module=module)
    args, rest = parser.parse_known_args(argv)
    verbose_flag = args.command in VERBOSE_COMMANDS  # then no abbreviations: "--verbose" is matched here
    if verbose_flag and "--verbose" not in rest:
        console.quiet()  # before the import: Megatron warns while its modules load
    module = importlib.import_module(args._module)
    return int(module.run(command_parser(args.command).parse_args(rest)) or 0)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `m2po NAME` (what `main` parses with; tests parse documented commands with it)."""
    module = importlib.import_module(COMMANDS[name][0])
    verbose_flag = name in VERBOSE_COMMANDS  # then no abbreviations: "--verbose" is matched in `main`
    parser = argparse.ArgumentParser(prog=f"m2po {name}", allow_abbrev=not verbose_flag)
    module.add_arguments(parser)
    if verbose_flag:
        console.add_verbose_argument(parser)
    return parser
