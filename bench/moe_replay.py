"""Routing replay, measured: a tiny Qwen3-MoE trained with M2PO (bounded mode) on CPU against a local engine whose
numerics differ from the fp32 trainer's (`rollout.local_dtype=bfloat16`), once with `algorithm.routing_replay`
replay and once off, same seed and prompts.

    python -m bench.moe_replay --out runs/moe_replay [--steps 12] [--experts 8] [--top-k 2] [--m2-budget 0.04]

Per run, the mean over its steps of: `moe/router_agreement` (trainer top-k = engine top-k, per token-layer of the
responses, the trainer routing on its own), `moe/m2_before_replay` / `moe/m2_before_no_replay` (M2 before
masking from a forward replaying the engine's routing / one that does not, both on the same mini-batches,
replay run only), and the loss's own `loss/m2_before` and `loss/masked_fraction` (what M2PO saw and masked).
Writes `moe_replay.json` in --out and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

from megatron_m2po.metrics import read_scalars
from megatron_m2po.models.tiny import make_tiny_model

TAGS = (
    "moe/router_agreement",
    "moe/m2_before_replay",
    "moe/m2_before_no_replay",
    "loss/m2_before",
    "loss/masked_fraction",
)


def recipe(model: Path, prompts: Path, steps: int, m2_budget: float) -> str:
    return f"""
model: {{path: {model}}}
data: {{path: {prompts}, apply_chat_template: true, max_prompt_tokens: 64}}
rollout: {{max_new_tokens: 16, local_dtype: bfloat16, reward_fn: "tests.e2e_rewards:odd_char_fraction"}}
algorithm: {{loss: m2po, m2_budget: {m2_budget}, routing_diagnostics_every: 1}}
staleness: {{mode: bounded, max_staleness: 2}}
train: {{steps: {steps}, groups_per_step: 2, groups_per_update: 1, responses_per_prompt: 4, micro_batch_size: 4,
         lr: 1.0e-3, torch_threads: 1}}
checkpoint: {{save_at_end: false}}
logging: {{console: none}}
"""


def run(out: Path, replay: str, steps: int, m2_budget: float, model: Path, prompts: Path) -> dict[str, float]:
    run_dir = out / f"routing_{replay}"
    config = out / "recipe.yaml"
    config.write_text(recipe(model, prompts, steps, m2_budget))
    cmd = [sys.executable, "-m", "megatron_m2po", "train", "--config", str(config)]
    cmd += [f"logging.run_dir={run_dir}", f"algorithm.routing_replay={replay}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    series = read_scalars(run_dir)
    return {tag: mean(v for _, v in series[tag]) for tag in TAGS if tag in series}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/moe_replay")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--m2-budget", type=float, default=0.04, help="algorithm.m2_budget (tau_M2)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(
        "qwen3_moe", out / "model", seed=11, num_experts=args.experts, num_experts_per_tok=args.top_k
    )
    prompts = out / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
            for a in range(16)
            for b in range(8)
        )
    )
    results = {
        replay: run(out, replay, args.steps, args.m2_budget, model, prompts) for replay in ("replay", "off")
    }
    (out / "moe_replay.json").write_text(json.dumps(results, indent=2))
    print(f"{'metric':28s} {'replay':>10s} {'off':>10s}")
    for tag in TAGS:
        cells = [
            f"{results[r][tag]:10.4g}" if tag in results[r] else f"{'-':>10s}" for r in ("replay", "off")
        ]
        print(f"{tag:28s} {' '.join(cells)}")


if __name__ == "__main__":
    main()
