"""Convert a Megatron checkpoint (from convert_hf_to_megatron.py or a training run) into an HF model dir.

    python tools/convert_megatron_to_hf.py --megatron-dir DIR --out DIR [--max-shard-size-gb 2]
    python tools/convert_megatron_to_hf.py --megatron-dir RUN/checkpoints/step_N/dist --hf-config-dir HF_DIR --out DIR

Writes sharded safetensors (+ model.safetensors.index.json), config.json and the tokenizer files.
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
        "--megatron-dir", required=True, help="Megatron checkpoint dir (has m2po_checkpoint.json)"
    )
    parser.add_argument("--out", required=True, help="output HF model dir")
    parser.add_argument(
        "--hf-config-dir",
        default=None,
        help="config.json + tokenizer source; needed for a raw dist checkpoint (a training run's checkpoints/step_N/dist)",
    )
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size limit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from megatron_m2po import platform
    from megatron_m2po.checkpoint.convert import convert_megatron_to_hf

    try:
        convert_megatron_to_hf(
            args.megatron_dir, args.out, max_shard_bytes=int(args.max_shard_size_gb * 1024**3)
        )
    finally:
        platform.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
