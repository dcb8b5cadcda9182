"""`python tools/evaluate.py CHECKPOINT --benchmark math500 ... [--data FILE ...]`: accuracy (avg@k, pass@k) of a checkpoint.

The same as `m2po evaluate`; the code lives in `megatron_m2po.evaluation` (the CPU demo uses it too).
"""

from __future__ import annotations

import argparse
import sys

from megatron_m2po.evaluation import __doc__ as _doc
from megatron_m2po.evaluation import add_arguments, run

__all__ = ["add_arguments", "run", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
