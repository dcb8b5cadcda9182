"""`python tools/evaluate.py CHECKPOINT --benchmark math500 ... [--data FILE ...]`: accuracy (avg@k, pass@k) of a checkpoint.

The same as `m2po evaluate` (`megatron_m2po/commands/evaluate.py`; its library, `rollout/evaluation.py`, serves the
trainer's held-out evaluation and the CPU demo too).
"""

from __future__ import annotations

import argparse
import sys

from megatron_m2po.commands.evaluate import __doc__ as _doc
from megatron_m2po.commands.evaluate import add_arguments, run

__all__ = ["add_arguments", "run", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
