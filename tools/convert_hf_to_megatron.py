"""Convert an HF model dir (config.json + safetensors) into a Megatron dist checkpoint dir.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR --tp N --pp M [--ep E]

The written checkpoint is resharded on load, so it serves any TP/PP/EP the config allows; --tp/--pp/--ep
are checked against the config (heads, kv heads, vocab, layers, experts) and recorded in
m2po_checkpoint.json. MoE checkpoints are read expert by expert (Hub names `mlp.experts.{e}.*`).
"""

from __future__ import annotations

import argparse
import logging
import os


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests parse the documented commands with it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-dir", required=True, help="HF model dir (config.json, *.safetensors, tokenizer)"
    )
    parser.add_argument("--out", required=True, help="output Megatron checkpoint dir")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size it is meant for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it is meant for")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size it is meant for (MoE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from megatron_m2po import platform
    from megatron_m2po.checkpoint.convert import convert_hf_to_megatron

    try:
        convert_hf_to_megatron(
            args.hf_dir,
            args.out,
            tensor_parallel=args.tp,
            pipeline_parallel=args.pp,
            expert_parallel=args.ep,
        )
    finally:
        platform.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
