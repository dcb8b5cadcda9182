"""`m2po train --config RECIPE.yaml [a.b=value ...] [--resume[=PATH]]`: run the training loop of `train.py`.

Under torchrun the same command is `torchrun ... -m megatron_m2po train --config RECIPE.yaml`. Exit status:
0 done, 1 the run stopped on a named error (its last checkpoint kept; fix it, then `--resume`), 2 a config
error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_m2po import console, platform
from megatron_m2po.config import ConfigError, load_config
from megatron_m2po.io_errors import WriteError
from megatron_m2po.rollout.stops import ProducerStopped
from megatron_m2po.train import train
from megatron_m2po.trainer.checkpointing import CheckpointError

logger = logging.getLogger("megatron_m2po.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from the newest checkpoint in run_dir that loads (older ones are tried if the newest "
        "is damaged); --resume=PATH continues from that checkpoint (a dir, or a step_N name in run_dir)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-6")


def run(args: argparse.Namespace) -> int:
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume a.b=c`: an override, not a PATH
        args.overrides, args.resume = [args.resume, *args.overrides], True
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    level, fmt = getattr(logging, cfg.logging.level), f"[rank{platform.rank()}] %(name)s: %(message)s"
    console.setup(getattr(args, "verbose", False), level, fmt)  # --verbose: other libraries' messages too
    try:
        train(cfg, resume=args.resume)
    except ConfigError as e:  # found once the model or the run dir is looked at
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ProducerStopped, WriteError, CheckpointError) as e:  # named; the last checkpoint kept
        logger.error("the run stopped: %s (fix it, then continue with --resume)", e, exc_info=True)
        return 1
    platform.destroy_distributed()
    return 0
