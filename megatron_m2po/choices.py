"""The names of the algorithm's interchangeable parts, one `Literal` each (no torch: config imports it).

config.py types its choice fields with these, so the allowed values come from the type; the algorithms
derive their own tuples from them (`AGGREGATIONS`, `ADVANTAGE_ESTIMATORS`) and the loss registry refuses,
at import, a loss not named here or a name here without a loss.
"""

from __future__ import annotations

from typing import Literal

LossName = Literal[
    "m2po",
    "m2po_clip",
    "grpo",
    "grpo_noclip",
    "tis",
    "decoupled_ppo",
    "gspo",
    "cispo",
    "topr",
    "on_policy",
]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AdvantageEstimator = Literal["grpo", "drgrpo", "rloo"]
M2Scope = Literal["global", "per_microbatch"]
NonFinite = Literal["raise", "mask"]
# Where the behaviour log-probs come from: the engine's sampling ones, or the trainer's recomputed ones.
BehaviorSource = Literal["engine", "trainer"]
# Environments (rollout/environments): how a prompt becomes scored samples; the multi-turn ones put
# environment tokens between model turns (`Environment.multi_turn`).
MultiTurnEnvName = Literal["tool_math"]
EnvName = Literal["math", MultiTurnEnvName]
# Rollout corrections (algorithms/corrections.py); the first two weight the loss by rho, the others only drop
# tokens, so only those apply where the loss's ratio already divides by the engine's probabilities.
WeightingCorrection = Literal["token_tis", "token_mis"]
CorrectionName = Literal[WeightingCorrection, "icepop", "seq_geo_mask", "seq_product_mask"]
# The benchmark test sets shipped with the package (megatron_m2po/data/benchmarks), by name.
BenchmarkName = Literal["math500", "aime24", "amc23", "gsm8k", "minerva_math", "olympiadbench"]
# The experiment trackers `logging.backends` may name (megatron_m2po/trackers).
TrackerName = Literal["tensorboard", "wandb", "mlflow"]
