"""Write a tiny random HF-format model + tokenizer (no network), for tests and the CPU demo.

python tools/make_tiny_model.py --arch qwen3 --out /tmp/tiny-qwen3 [--set hidden_size=256 num_hidden_layers=4]
"""

from __future__ import annotations

import argparse
import json
import logging

from megatron_m2po.models.tiny import ARCHS, make_tiny_model


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON when they are JSON (numbers, booleans, dicts), else kept as strings."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="model family")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="random init seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="HF config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_tiny_model(args.arch, args.out, seed=args.seed, **parse_overrides(args.set))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
