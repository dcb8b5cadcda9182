"""The training job's configuration: typed dataclasses, filled from a YAML recipe plus `a.b=value` overrides.

Every option is defined exactly once here, with a one-line help string, and read in exactly one place
(`grep m2_budget` finds its definition and its use). Everything is validated before any process group
or model is built, so a typo costs seconds, not a cluster allocation: errors name the key, the file
and the expected value, and an unknown key suggests the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_m2po.choices import (
    AdvantageEstimator,
    Aggregation,
    BehaviorSource,
    BenchmarkName,
    CorrectionName,
    EnvName,
    LossName,
    M2Scope,
    MultiTurnEnvName,
    TrackerName,
    WeightingCorrection,
)
from megatron_m2po.staleness import MODES, ModeName, mode_named

# A multi-turn environment's bound on a trajectory's response (model and environment tokens together):
# rollout.env -> (its rollout.env_settings key, the default). The environment's settings take the default
# from here, so the microbatch check below and the environment agree on the longest response.
ENV_RESPONSE_BUDGET: dict[str, tuple[str, int]] = {"tool_math": ("max_total_tokens", 2048)}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (and the file when there is one)."""


# Error messages show a value through this: a few items of a list, the ends of a long string, `...` where
# something was left out. Why: a value built from nested YAML aliases renders to gigabytes in full.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 2, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40


def show(value: Any) -> str:
    """`repr(value)` bounded in length and depth, for error messages."""
    return _SHOWN.repr(value)


# The largest integer a config key takes: every int ends in torch / numpy / C code as a signed 64-bit value.
MAX_INT = 2**63 - 1


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose aliases may name a scalar or a flat list / mapping of scalars (a shared value,
    a list of URLs, a `<<: *defaults` merge), never a collection that holds collections.

    Why: aliases of aliases nest exponentially (a 464-byte recipe expands to billions of items) and a recipe
    has no nested values where they would be needed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            if any(not isinstance(child, yaml.ScalarNode) for child in children):
                raise ConfigError(
                    f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}: alias "
                    f"*{event.anchor[:60]} names a nested collection; a recipe's aliases may name a scalar "
                    "or a flat list / mapping of scalars"
                )
            return node
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python converts at most 4300 digits
            raise ConfigError(
                f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}: an integer of "
                f"{len(node.value)} characters, far beyond any setting"
            ) from None


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """A recipe's YAML (safe tags only, aliases as `_RecipeLoader` allows); raises yaml.YAMLError or
    ConfigError."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field: default, one-line help, and bounds (checked by `validate`).

    A choice field is typed `Literal[...]`: its allowed values are the type's (`choices_of`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt(
        "", "policy to train: an HF model dir (config.json + safetensors) or a Megatron checkpoint dir"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto",
        "parameter dtype; auto = bf16 on GPU, fp32 on CPU",
    )
    router_aux_loss_coef: float | None = opt(
        None,
        "MoE models: coefficient of Megatron's per-layer load-balancing loss; unset = config.json's "
        "router_aux_loss_coef (0 turns it off)",
        ge=0,
    )


@dataclass
class DataConfig:
    path: str = opt(
        "",
        "training prompts: a .jsonl or .parquet file, else a name the `datasets` library loads (a Hugging Face "
        "Hub dataset such as BytedTsinghua-SIA/DAPO-Math-17k, or a local dataset folder; the [hub] extra)",
    )
    split: str = opt("train", "`datasets` sets only: the split to read")
    subset: str = opt("", "`datasets` sets only: the configuration (subset) name; empty = the default")
    problem_key: str = opt(
        "problem", "row field holding the problem text; dotted for a nested field (prompt.0.content)"
    )
    answer_key: str = opt(
        "answer",
        "row field holding the reference answer; dotted for a nested field (reward_model.ground_truth)",
    )
    answer_format: Literal["plain", "boxed", "gsm8k"] = opt(
        "plain",
        "how the answer field is read: as is, its last \\boxed{}, or GSM8K's `#### x`",
    )
    template: str = opt(
        "{problem}",
        "prompt text built from the row; `{problem}` is replaced by the problem; `m2po` = the paper's",
    )
    apply_chat_template: bool = opt(
        True, "wrap the prompt with the tokenizer's chat template when it has one"
    )
    max_prompt_tokens: int = opt(
        1536, "prompts longer than this (in tokens) are filtered out and counted", gt=0
    )
    max_prompt_chars: int = opt(
        100_000,
        "rows whose problem text is longer than this (in characters) are refused before tokenizing and "
        "counted: bounds the tokenizer's time and memory on a hostile row",
        gt=0,
    )
    on_error: Literal["raise", "skip"] = opt(
        "raise",
        "a malformed row: raise an error naming file and line, or skip and count it",
    )


@dataclass
class RolloutConfig:
    engine: Literal["local", "sglang", "vllm"] = opt("local", "inference engine kind")
    local_dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "local engine: its weights' dtype; auto = the trainer's (model.dtype). bfloat16 against a float32 trainer "
        "gives the engine-vs-trainer mismatch that the rollout corrections address, on CPU",
    )
    num_engines: int = opt(1, "number of in-process engines (local / vllm); sglang uses `urls`", ge=1)
    urls: list = opt(
        [], "sglang / vllm servers: base URLs, e.g. [http://127.0.0.1:30000] (vllm without urls: in process)"
    )
    router_url: str = opt(
        "", "sglang: an sglang-router in front of `urls`; generation goes through it, control calls to every url"
    )
    sglang_deterministic: bool = opt(
        False,
        "sglang: servers run with --enable-deterministic-inference; each sample is then its own request "
        "seeded from (train.seed, version, prompt, index). Off: one request with n samples, no seed",
    )
    api_key_env: str = opt(
        "M2PO_API_KEY",
        "sglang: NAME of the environment variable holding the servers' --api-key (the key is never written in "
        "a config or log); unset or empty variable: no key is sent",
    )
    admin_api_key_env: str = opt(
        "M2PO_ADMIN_API_KEY",
        "sglang: NAME of the environment variable holding the servers' --admin-api-key, sent on control routes "
        "(pause, abort, flush, weight updates); unset or empty: they get the api key",
    )
    max_new_tokens: int = opt(256, "maximum response length in tokens", gt=0)
    temperature: float = opt(
        1.0, "sampling temperature; the trainer divides its logits by the same value", gt=0
    )
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = opt(-1, "top-k sampling; -1 = off", ge=-1)
    behavior_logprobs: BehaviorSource = opt(
        "engine",
        "behaviour log-probs in the ratio: the engine's sampling log-probs, or `trainer`: recomputed by the "
        "trainer with the producing weights right after generation (sync/fixed only, as the released code)",
    )
    sync_every: int = opt(
        1, "push weights to the engines every this many optimizer updates (bounded mode)", ge=1
    )
    weight_transport: Literal["auto", "tensors", "disk", "distributed"] = opt(
        "auto",
        "how weights reach the engines: in-process tensors, an HF dir on disk, or a distributed update group "
        "(NCCL on GPU); auto = tensors for in-process engines, distributed for servers on GPU, disk otherwise",
    )
    max_inflight_groups: int = opt(
        8, "bounded mode: prompt groups generated concurrently by the rollout manager", ge=1
    )
    request_timeout: float = opt(
        3600.0,
        "seconds one generation request may take on an engine before the farm gives up on it (a hung engine) "
        "and sends it to another; a late reply is discarded",
        gt=0,
    )
    engine_max_failures: int = opt(
        3,
        "failed or timed-out requests in a row (or missed health checks) after which an engine leaves "
        "rotation; it returns when a health check finds it answering. Missed health checks also resubmit "
        "its requests in flight elsewhere",
        ge=1,
    )
    health_interval: float = opt(10.0, "seconds between the engines' health checks (bounded mode)", gt=0)
    weight_sync_timeout: float = opt(
        300.0,
        "seconds an engine may take for each step of a weight push (pause, one bucket's broadcast and reply, "
        "finish, a load from disk): an engine past it, or dead, leaves the push and rotation, the update group "
        "is rebuilt for the others under a new name and the push completes for them",
        gt=0,
    )
    dynamic_sampling: bool = opt(
        False,
        "drop prompt groups whose rewards do not vary (std 0 or below dynamic_sampling_min_std) before the queue "
        "and generate others in their place, so every trained group carries signal (DAPO; docs/training.md)",
    )
    dynamic_sampling_min_std: float = opt(
        0.0,
        "dynamic sampling: lowest kept standard deviation (Bessel's) of a group's task rewards; 0 = drop only "
        "groups whose rewards are all equal",
        ge=0,
    )
    dynamic_sampling_max_oversampling: float = opt(
        10.0,
        "dynamic sampling: most prompt groups generated per group trained; a run that needs more (its prompts "
        "saturated) stops with PromptsSaturated",
        ge=1,
    )
    env: EnvName = opt(
        "math",
        "environment turning a prompt into scored samples: math = one model turn scored by reward_fn; "
        "tool_math = model turns and sandboxed Python tool calls, the final answer scored by reward_fn "
        "(docs/environments.md)",
    )
    env_settings: dict = opt(
        {}, "the environment's own settings, checked against it when the rollout side is built (docs/rollout.md)"
    )
    reward_fn: str = opt(
        "megatron_m2po.rollout.rewards:math_reward",
        "reward function `module:function(response, answer) -> float`",
    )
    format_reward: float = opt(
        0.0, "reward of an extracted but wrong answer (the paper: 0.1; released code: 0)", ge=0
    )
    reward_workers: int = opt(1, "processes scoring responses", ge=1)
    reward_timeout: float = opt(5.0, "seconds before a reward call is abandoned and scored 0", gt=0)


@dataclass
class AlgorithmConfig:
    """Each loss's hyperparameters are the keyword parameters of its function in algorithms/losses.py, and
    each has the key of the same name here, read by the losses its help names. Their defaults are the
    losses' own, kept there only: a key left null gives each loss its own default (docs/algorithms.md)."""

    loss: LossName = opt("m2po", "policy loss (algorithms.get_loss name)")
    advantage: AdvantageEstimator = opt("grpo", "advantage estimator over each prompt group")
    aggregation: Literal["auto", Aggregation] = opt(
        "auto", "loss aggregation over the mini-batch; auto = the loss's own"
    )
    m2_budget: float | None = opt(
        None,
        "m2po / m2po_clip: second-moment budget tau_M2 on the trust-region tokens; null = the loss's own",
        gt=0,
    )
    m2_scope: M2Scope | None = opt(
        None,
        "m2po: mask over the whole optimizer mini-batch (all DP ranks, all micro-batches) "
        "or per micro-batch as the released code; null = the loss's own",
    )
    miniclip_low: float | None = opt(
        None, "m2po_clip: floor of the lower clip epsilon (the released code's 0.3); null = the loss's own", gt=0
    )
    miniclip_high: float | None = opt(
        None, "m2po_clip: floor of the upper clip epsilon (the released code's 0.5); null = the loss's own", gt=0
    )
    clip_eps: float | None = opt(
        None, "grpo / decoupled_ppo / gspo / cispo: lower clip epsilon; null = the loss's own", gt=0
    )
    clip_eps_high: float | None = opt(
        None,
        "grpo / decoupled_ppo / gspo / cispo: upper clip epsilon (clip-higher: 0.28); null = the loss's own",
        gt=0,
    )
    dual_clip: float | None = opt(None, "grpo: dual-clip constant c (e.g. 3); null = the loss's own", gt=1)
    tis_ratio_cap: float | None = opt(
        None, "tis: cap C of the truncated importance weight min(r, C); null = the loss's own", gt=0
    )
    behavior_weight_cap: float | None = opt(
        None, "decoupled_ppo: cap of the behaviour weight min(pi_prox / mu, cap); null = the loss's own", gt=0
    )
    rollout_corrections: list = opt(
        [],
        "rollout corrections applied in order before the loss (docs/algorithms.md): token_tis, token_mis "
        "(weight by mu_trainer / mu_engine: rollout.behavior_logprobs=trainer only), icepop, seq_geo_mask, "
        "seq_product_mask (drop tokens / responses; any mode)",
    )
    engine_mismatch_tis_cap: float | None = opt(
        None, "token_tis: cap C of the weight min(rho, C); null = the rule's own (2)", gt=0
    )
    mis_low: float | None = opt(None, "token_mis: lowest kept rho; null = the rule's own (0.5)", gt=0)
    mis_high: float | None = opt(None, "token_mis: highest kept rho; null = the rule's own (2)", gt=0)
    icepop_low: float | None = opt(None, "icepop: lowest kept rho; null = the rule's own (0.5)", gt=0)
    icepop_high: float | None = opt(None, "icepop: highest kept rho; null = the rule's own (5)", gt=0)
    geo_mask_low: float | None = opt(
        None, "seq_geo_mask: lowest kept geometric mean of rho over a response; null = the rule's own (0.999)", gt=0
    )
    geo_mask_high: float | None = opt(
        None, "seq_geo_mask: highest kept geometric mean of rho; null = the rule's own (1.001)", gt=0
    )
    seq_mask_low: float | None = opt(
        None, "seq_product_mask: lowest kept product of rho over a response; null = the rule's own (0.5)", gt=0
    )
    seq_mask_high: float | None = opt(
        None, "seq_product_mask: highest kept product of rho; null = the rule's own (2)", gt=0
    )
    routing_replay: Literal["off", "replay"] | None = opt(
        None,
        "MoE models: replay = the engines return the experts they routed every token to and the trainer's "
        "forwards route to the same ones; off = each routes on its own (nothing recorded); unset = replay for MoE "
        "models; replay is refused for dense models and for vllm engines",
    )
    routing_diagnostics_every: int = opt(
        10,
        "routing replay on: every this many optimizer updates, two extra no-grad forwards (with and without "
        "replay) before the update give moe/router_agreement and moe/m2_before_(no_)replay; 0 = never",
        ge=0,
    )
    overlong_filtering: bool = opt(
        False, "leave responses cut at rollout.max_new_tokens out of the loss and its token count (DAPO)"
    )
    overlong_buffer: int = opt(
        0,
        "soft overlong punishment (DAPO eq. 13): L_cache, the last tokens before rollout.max_new_tokens over "
        "which the reward falls linearly to -1; 0 = off",
        ge=0,
    )


@dataclass
class StalenessConfig:
    mode: ModeName = opt("bounded", "; ".join(f"{m.name}: {m.help}" for m in MODES.values()))
    fixed_lag_steps: int = opt(0, "fixed: K, the number of generated batches held in the FIFO", ge=0)
    overlap_generation: bool = opt(
        True,
        "fixed with K >= 1: generate the step's new batch (current weights) while training on the oldest, "
        "as the FIFO allows; off with rollout.behavior_logprobs=trainer (its relabel needs the model)",
    )
    max_staleness: int = opt(4, "bounded: the largest allowed staleness in optimizer updates", ge=0)
    queue_capacity: int = opt(1024, "most prompt groups the replay queue holds (back-pressure above)", ge=1)
    journal_fsync: Literal["batch", "always", "never"] = opt(
        "batch", "when the queue journal is fsynced"
    )
    journal_segment_bytes: int = opt(
        64 << 20, "queue journal segment size: GC frees whole segments the oldest kept checkpoint consumed", ge=4096
    )


@dataclass
class TrainConfig:
    steps: int = opt(
        100,
        "training steps; each consumes groups_per_step groups in groups_per_step / "
        "groups_per_update optimizer updates (fixed mode runs fixed_lag_steps fill steps first)",
        ge=1,
    )
    groups_per_step: int = opt(8, "prompt groups consumed per step", ge=1)
    responses_per_prompt: int = opt(8, "responses sampled per prompt (the group size n)", ge=1)
    groups_per_update: int = opt(8, "mini-batch: prompt groups per optimizer update", ge=1)
    micro_batch_size: int = opt(
        8, "sequences per micro-batch on one DP rank (forward/backward unit; unused with a token budget)", ge=1
    )
    max_tokens_per_microbatch: int = opt(
        0,
        "token budget of a packed micro-batch (0 = micro_batch_size sequences each): sequences are balanced "
        "by tokens over DP ranks and the fewest micro-batches that fit; implies pack_sequences",
        ge=0,
    )
    pack_sequences: bool = opt(
        False, "concatenate a micro-batch's sequences without padding (THD, cu_seqlens) for the forward"
    )
    lr: float = opt(1e-6, "peak learning rate", gt=0)
    min_lr: float = opt(0.0, "final learning rate of a cosine / linear schedule", ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = opt("constant", "learning-rate decay")
    warmup_updates: int = opt(0, "optimizer updates of linear warm-up", ge=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    seed: int = opt(
        0, "seed of the model init RNG, prompt order and sampling (numpy's range)", ge=0, le=2**32 - 1
    )
    torch_threads: int = opt(0, "torch intra-op threads of the trainer (0 = leave torch's default)", ge=0)


@dataclass
class ParallelConfig:
    tensor: int = opt(1, "tensor-parallel size", ge=1)
    pipeline: int = opt(1, "pipeline-parallel size", ge=1)
    context: int = opt(
        1,
        "context-parallel size: every sequence is cut into 2 x context chunks, each rank holding two (one "
        "early, one late: balanced causal attention); for long responses (16-32k tokens). Carved from DP",
        ge=1,
    )
    expert: int = opt(
        1, "MoE models: expert-parallel size (each rank holds num_experts / expert experts); carved from DP", ge=1
    )
    expert_tensor: int | None = opt(
        None,
        "MoE models: tensor-parallel size inside each expert; unset = parallel.tensor (Megatron's default). "
        "Smaller (e.g. 1: whole experts) needs parallel.expert > 1",
        ge=1,
    )
    sequence_parallel: bool = opt(
        False, "split norm/dropout activations along the sequence over the TP ranks (needs tensor > 1)"
    )
    recompute: Literal["none", "selective", "full"] = opt(
        "none",
        "activation recompute in the backward: selective = core attention only, full = whole layers "
        "(recompute_num_layers per checkpoint); trades compute for activation memory",
    )
    recompute_num_layers: int = opt(1, "full recompute: layers per checkpointed chunk (uniform method)", ge=1)
    distributed_optimizer: bool = opt(
        False, "Megatron's distributed optimizer (ZeRO-1): fp32 master weights and Adam moments sharded over DP"
    )
    overlap_grad_reduce: bool = opt(
        False, "overlap the DP gradient reduce (all-reduce, or reduce-scatter) with the backward, by bucket"
    )

    @property
    def expert_tensor_size(self) -> int:
        """The expert-tensor-parallel size in effect (`expert_tensor`, or `tensor` when unset)."""
        return self.tensor if self.expert_tensor is None else self.expert_tensor


@dataclass
class CheckpointConfig:
    save_every: int = opt(
        0, "save a training checkpoint every this many steps (0 = only at the end / on SIGTERM)", ge=0
    )
    keep_last: int = opt(2, "keep only the newest this many training checkpoints", ge=1)
    save_at_end: bool = opt(True, "save a checkpoint after the last step")
    export_hf_at_end: bool = opt(False, "also write the final policy as an HF model dir (run_dir/hf)")


@dataclass
class LoggingConfig:
    run_dir: str = opt(
        "runs/default", "output dir: TensorBoard events, checkpoints, queue journal, resolved config"
    )
    reuse_run_dir: bool = opt(
        False,
        "let a fresh run write into a run_dir that holds files this project did not write (they are left "
        "alone; config.yaml and the queue journal's files are replaced)",
    )
    console: Literal["rich", "tqdm", "none"] = opt("rich", "per-step console progress line")
    backends: list = opt(
        ["tensorboard"],
        "experiment trackers that get the metrics, the config and the git commit: any of tensorboard "
        "(run_dir/tb), wandb, mlflow (the [tracking] extra); [] = the console only",
    )
    run_name: str = opt("", "the run's name in wandb and MLflow; empty = the name of run_dir")
    wandb_project: str = opt("megatron_m2po", "wandb project")
    wandb_entity: str = opt("", "wandb team or user; empty = your default entity")
    wandb_mode: Literal["online", "offline"] = opt(
        "online", "offline: the run stays in run_dir/wandb (upload it later with `wandb sync`)"
    )
    mlflow_tracking_uri: str = opt(
        "",
        "MLflow tracking server or store URI; empty = a local file store in run_dir/mlruns "
        "(`mlflow ui --backend-store-uri RUN_DIR/mlruns`)",
    )
    mlflow_experiment: str = opt("megatron_m2po", "MLflow experiment the run is filed under")
    histograms: bool = opt(True, "log the staleness histogram every step (to the trackers that have them)")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = opt("INFO", "python logging level")


@dataclass
class EvalConfig:
    benchmarks: list = opt(
        [],
        f"benchmarks shipped with the package evaluated every `every` steps, by name "
        f"({', '.join(typing.get_args(BenchmarkName))})",
    )
    path: str = opt("", "your own held-out prompt file, evaluated beside the benchmarks (empty = none)")
    every: int = opt(
        0, "evaluate every this many steps (0 = off); also before the first and after the last", ge=0
    )
    max_prompts: int = opt(0, "evaluate on at most this many prompts (0 = all)", ge=0)
    responses_per_prompt: int = opt(1, "responses per eval prompt (accuracy is their average: avg@k)", ge=1)
    temperature: float = opt(0.0, "eval sampling temperature (0 = greedy)", ge=0)
    problem_key: str = opt("problem", "eval.path: row field holding the problem text")
    answer_key: str = opt("answer", "eval.path: row field holding the reference answer")
    answer_format: Literal["plain", "boxed", "gsm8k"] = opt("plain", "eval.path: how the answer field is read")


@dataclass
class SandboxConfig:
    workers: int = opt(4, "sandboxed Python tool calls run at once, each in a fresh process", ge=1)
    cpu_seconds: int = opt(10, "CPU seconds one tool call may use (RLIMIT_CPU)", ge=1)
    wall_seconds: float = opt(20.0, "wall-clock seconds before a tool call is killed", gt=0)
    memory_mb: int = opt(1024, "address space of each process of a tool call, MB (RLIMIT_AS)", ge=64)
    max_processes: int = opt(
        16,
        "processes and threads one tool call may run at once (RLIMIT_NPROC, counted in the call's own user "
        "namespace)",
        ge=1,
    )
    max_output_bytes: int = opt(
        65536, "stdout and stderr kept per call, each; beyond it the output is cut with a marker and the call "
        "killed",
        ge=1024,
    )
    disk_mb: int = opt(64, "size of the call's private /tmp (its working directory) and of each file, MB", ge=1)
    allow_unisolated: bool = opt(
        False,
        "where Linux namespaces are unavailable, run tool calls with the resource limits only (no network, "
        "filesystem or process isolation); off: refuse to start and name what is missing",
    )
    outside_uid: int = opt(
        65534,
        "when the trainer runs as root: the unprivileged uid and gid (outside the namespace) a tool call runs as",
        ge=1,
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    # ---- derived quantities (one definition each) ----
    @property
    def updates_per_step(self) -> int:
        return self.train.groups_per_step // self.train.groups_per_update

    @property
    def fixed_lag_updates(self) -> int:
        """The exact lag s of `fixed` mode in optimizer updates (0 for `sync`)."""
        return mode_named(self.staleness.mode).lag_updates(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# ---------------------------------------------------------------- loading


def _sections() -> dict[str, type]:
    """Section name -> its dataclass, in the recipe's order."""
    return typing.get_type_hints(Config)


def choices_of(tp: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` field type, optional or not (nested Literals flattened); None
    for other types."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


# keys that were renamed or split: the old key's error says where its meaning went
_MOVED = {
    "algorithm.tis_cap": "it was split by meaning into algorithm.tis_ratio_cap (the tis loss), "
    "algorithm.behavior_weight_cap (decoupled_ppo) and algorithm.engine_mismatch_tis_cap "
    "(the engine-mismatch TIS factor)",
    "algorithm.engine_mismatch_tis": "the engine-mismatch truncated IS is the rollout correction token_tis: "
    "algorithm.rollout_corrections=[token_tis] (cap: algorithm.engine_mismatch_tis_cap)",
    "logging.tensorboard": "trackers are chosen by logging.backends, a list of tensorboard, wandb, mlflow: "
    "logging.backends=[tensorboard] (the default) keeps TensorBoard, logging.backends=[] turns it off",
    **{
        old: f"it is now {new} (the same meaning)"
        for old, new in {
            "train.prompts_per_step": "train.groups_per_step",
            "train.prompts_per_update": "train.groups_per_update",
            "eval.samples_per_prompt": "eval.responses_per_prompt",
        }.items()
    },
}


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check (and where lossless, convert) `value` to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if choices_of(tp):  # membership is checked in `validate`, with a did-you-mean
        if isinstance(value, bool) and isinstance(choices_of(tp)[0], str):
            value = "on" if value else "off"  # YAML 1.1 reads on / off (yes / no) as booleans
        tp = type(choices_of(tp)[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}'{key}': expected true/false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}'{key}': expected an integer, got {show(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads `1e-6` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}'{key}': expected a number, got {show(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}'{key}': expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}'{key}': expected a string, got {show(value)}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        raise ConfigError(f"{where}'{key}': expected a list, got {show(value)}")
    if tp is dict or origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"{where}'{key}': expected a mapping of names to values, got {show(value)}")
    raise ConfigError(f"{where}'{key}': unsupported field type {tp}")


def _set(cfg: Config, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    sections = _sections()
    if len(parts) != 2:
        valid = [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
        same_name = [v for v in valid if v.split(".")[1] == parts[-1]]
        hint = f"; did you mean '{same_name[0]}'?" if same_name else _closest(dotted, valid)
        raise ConfigError(f"{where}'{dotted}': keys have the form section.name{hint}")
    section, name = parts
    if section not in sections:
        raise ConfigError(f"{where}unknown section '{section}'{_closest(section, list(sections))}")
    cls = sections[section]
    names = [f.name for f in dataclasses.fields(cls)]
    if dotted in _MOVED:
        raise ConfigError(f"{where}'{dotted}' is no longer a key: {_MOVED[dotted]}")
    if name not in names:
        valid = [f"{section}.{n}" for n in names]
        raise ConfigError(f"{where}unknown key '{dotted}'{_closest(dotted, valid)}")
    tp = typing.get_type_hints(cls)[name]
    setattr(getattr(cfg, section), name, _coerce(dotted, value, tp, where))


def _apply_mapping(cfg: Config, data: Any, where: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}the recipe must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        names = [section, *(values if isinstance(values, dict) else ())]
        odd = next((n for n in names if not isinstance(n, str)), None)
        if odd is not None:
            raise ConfigError(f"{where}section and key names are plain words, got {show(odd)}")
        if not isinstance(values, dict):
            sections = _sections()
            if section not in sections:
                raise ConfigError(
                    f"{where}unknown section '{section}'{_closest(str(section), list(sections))}"
                )
            raise ConfigError(f"{where}section '{section}' must be a mapping of keys, got {show(values)}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, where)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 3 -> int, 1e-6 -> float, [a,b] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as e:
        raise ConfigError(f"override '{key}': {e}") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML recipe <- `a.b=value` overrides, then `validate`. Raises ConfigError."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None
        try:
            data = parse_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        _apply_mapping(cfg, data, f"{path}: ")
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, "command line: ")
    try:
        validate(cfg)
    except ConfigError as e:
        source = f"{path}" + (" + command-line overrides" if overrides else "") if path else "command line"
        raise ConfigError(f"{source}: {e}") from None
    return cfg


# ---------------------------------------------------------------- validation


def _check_field(section: str, f: dataclasses.Field, tp: Any, value: Any) -> None:
    key = f"{section}.{f.name}"
    m = f.metadata
    if value is None:  # an optional field left unset
        return
    choices = choices_of(tp)
    if choices and value not in choices:
        close = (
            difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            if len(str(value)) < 100
            else []
        )
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{key}': {show(value)} is not one of {list(choices)}{hint}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        b = m.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"'{key}': must be {word} {b}, got {show(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(
            f"'{key}': must fit a signed 64-bit integer (|value| <= 2**63 - 1), got {show(value)}"
        )


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every value and the relations between them; raise ConfigError naming the key.

    `world_size` (when known, e.g. under torchrun) also checks that TP x PP divides it and that the
    data-parallel size divides the batch.
    """
    for section, cls in _sections().items():
        obj, hints = getattr(cfg, section), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _check_field(section, f, hints[f.name], getattr(obj, f.name))

    t, s, r, a = cfg.train, cfg.staleness, cfg.rollout, cfg.algorithm
    if not cfg.model.path:
        raise ConfigError("'model.path': required (an HF model dir or a Megatron checkpoint dir)")
    if not cfg.data.path:
        raise ConfigError("'data.path': required (a .jsonl or .parquet prompt file, or a `datasets` name)")
    if "{problem}" not in cfg.data.template and cfg.data.template not in ("plain", "m2po"):
        raise ConfigError(
            f"'data.template': must contain '{{problem}}' or be plain/m2po, got {show(cfg.data.template)}"
        )
    if t.groups_per_step % t.groups_per_update:
        raise ConfigError(
            f"'train.groups_per_update': {t.groups_per_update} does not divide "
            f"train.groups_per_step={t.groups_per_step} (a step is a whole number of optimizer updates)"
        )
    if t.min_lr > t.lr:
        raise ConfigError(f"'train.min_lr': {t.min_lr} is larger than train.lr={t.lr}")
    if a.overlong_buffer > r.max_new_tokens:
        raise ConfigError(
            f"'algorithm.overlong_buffer': {a.overlong_buffer} is longer than rollout.max_new_tokens="
            f"{r.max_new_tokens} (the penalty ramp lies inside the response budget)"
        )
    if r.dynamic_sampling and t.responses_per_prompt < 2:
        raise ConfigError(
            "'rollout.dynamic_sampling': needs train.responses_per_prompt >= 2 (the rewards of a group of one "
            "response never vary, so every group would be dropped)"
        )
    for key in ("dynamic_sampling_min_std", "dynamic_sampling_max_oversampling"):
        if not r.dynamic_sampling and getattr(r, key) != getattr(RolloutConfig, key):
            raise ConfigError(f"'rollout.{key}': set, but rollout.dynamic_sampling is off")
    for name in a.rollout_corrections:
        if name in typing.get_args(WeightingCorrection) and r.behavior_logprobs != "trainer":
            raise ConfigError(
                f"'algorithm.rollout_corrections': {name} weights the loss by mu_trainer / mu_engine and needs "
                "rollout.behavior_logprobs=trainer (sync/fixed); with the engine's log-probs as behaviour "
                "(bounded always) the loss's ratio already divides by mu_engine: use icepop, seq_geo_mask "
                "or seq_product_mask there"
            )
    if len(set(a.rollout_corrections)) != len(a.rollout_corrections):
        raise ConfigError(f"'algorithm.rollout_corrections': a rule is listed twice in {a.rollout_corrections}")
    for low, high in (
        ("mis_low", "mis_high"),
        ("icepop_low", "icepop_high"),
        ("geo_mask_low", "geo_mask_high"),
        ("seq_mask_low", "seq_mask_high"),
    ):
        lo, hi = getattr(a, low), getattr(a, high)
        if lo is not None and hi is not None and not lo < hi:
            raise ConfigError(f"'algorithm.{low}': {lo} must be below algorithm.{high}={hi}")
    problems = mode_named(s.mode).config_problems(cfg)  # what this staleness mode needs of the rest
    if problems:
        key, problem = problems[0]
        raise ConfigError(f"'{key}': {problem}")
    if a.routing_replay == "replay" and r.env in typing.get_args(MultiTurnEnvName):
        raise ConfigError(_multi_turn_replay_problem("replay", r.env))
    check_microbatch_budget(cfg)
    pl = cfg.parallel
    if pl.sequence_parallel and pl.tensor == 1:
        raise ConfigError("'parallel.sequence_parallel': needs parallel.tensor > 1 (it splits over the TP ranks)")
    if pl.expert_tensor is not None and pl.tensor % pl.expert_tensor:
        raise ConfigError(
            f"'parallel.expert_tensor': {pl.expert_tensor} does not divide parallel.tensor={pl.tensor}"
        )
    if pl.expert == 1 and pl.expert_tensor not in (None, pl.tensor):
        raise ConfigError(
            f"'parallel.expert_tensor': {pl.expert_tensor} differs from parallel.tensor={pl.tensor}, which needs "
            "parallel.expert > 1 (megatron-core sums expert gradients over the expert-data-parallel ranks only "
            "under expert parallelism; TP ranks holding the same expert would drift apart)"
        )
    if r.engine == "sglang" and not r.urls:
        raise ConfigError(
            "'rollout.urls': sglang needs its server URLs"
            + (f" (the workers behind rollout.router_url={r.router_url})" if r.router_url else "")
        )
    if r.local_dtype != "auto" and r.engine != "local":
        raise ConfigError(f"'rollout.local_dtype': only for rollout.engine=local, got {r.engine}")
    if r.router_url and r.engine != "sglang":
        raise ConfigError(f"'rollout.router_url': only for rollout.engine=sglang, got {r.engine}")
    for key, values, allowed in (
        ("logging.backends", cfg.logging.backends, typing.get_args(TrackerName)),
        ("eval.benchmarks", cfg.eval.benchmarks, typing.get_args(BenchmarkName)),
        ("algorithm.rollout_corrections", cfg.algorithm.rollout_corrections, typing.get_args(CorrectionName)),
    ):
        for value in values:
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                raise ConfigError(
                    f"'{key}': {value!r} is not one of {list(allowed)}"
                    + (f" (did you mean '{close[0]}'?)" if close else "")
                )
        if len(set(values)) != len(values):
            raise ConfigError(f"'{key}': {values} names one twice")
    if cfg.eval.every and not (cfg.eval.benchmarks or cfg.eval.path):
        raise ConfigError("'eval.benchmarks': name at least one (or set eval.path) when eval.every > 0")
    if world_size is not None:
        validate_parallel(cfg, world_size)


# What Megatron splits evenly over the ranks of each parallel dimension (HF config key -> config key).
_SPLIT_BY = {
    "num_attention_heads": "parallel.tensor",
    "num_key_value_heads": "parallel.tensor",
    "intermediate_size": "parallel.tensor",
    "vocab_size": "parallel.tensor",
    "num_hidden_layers": "parallel.pipeline",
}


def _validate_expert_layout(cfg: Config, world_size: int, model: Any) -> None:
    """megatron-core 0.16's expert grid: ETP x EP x PP ranks divide the world (the rest is expert-DP), EP
    splits the experts evenly, ETP the expert FFN; MoE with TP > 1 trains only with sequence parallelism."""
    p = cfg.parallel
    etp = p.expert_tensor_size
    grid = etp * p.expert * p.pipeline
    if world_size % grid:
        raise ConfigError(
            f"'parallel.expert': parallel.expert_tensor x parallel.expert x parallel.pipeline = "
            f"{etp} x {p.expert} x {p.pipeline} = {grid} does not divide the world size {world_size}"
        )
    if model is None:
        return
    experts = getattr(model, "num_experts", None)
    if not is_moe(model):
        for key, value, unset in (("expert", p.expert, 1), ("expert_tensor", p.expert_tensor, None)):
            if value != unset:
                raise ConfigError(
                    f"'parallel.{key}': {value}, but {cfg.model.path} is a dense model (no experts); "
                    f"leave it at {unset}"
                )
        return
    if experts % p.expert:
        raise ConfigError(
            f"'parallel.expert': {p.expert} does not divide the model's num_experts = {experts} ({cfg.model.path})"
        )
    if p.tensor > 1 and not p.sequence_parallel:
        raise ConfigError(
            "'parallel.sequence_parallel': MoE models with parallel.tensor > 1 need it (megatron-core refuses "
            "to train an MoE layer under tensor parallelism without sequence parallelism)"
        )
    ffn = getattr(model, "moe_intermediate_size", None)
    if isinstance(ffn, int) and ffn % etp:
        raise ConfigError(
            f"'parallel.expert_tensor': {etp} does not divide the model's moe_intermediate_size = "
            f"{ffn} ({cfg.model.path})"
        )


def is_moe(model: Any) -> bool:
    """An HF config with routed experts (Qwen3-MoE's num_experts)."""
    experts = getattr(model, "num_experts", None)
    return isinstance(experts, int) and experts > 0


def longest_response(cfg: Config) -> tuple[str, int]:
    """The longest response a rollout can return, with the key that bounds it: rollout.max_new_tokens for
    one model turn; a multi-turn environment's response budget (tool_math: model and tool tokens together)."""
    if cfg.rollout.env not in ENV_RESPONSE_BUDGET:
        return "rollout.max_new_tokens", cfg.rollout.max_new_tokens
    key, default = ENV_RESPONSE_BUDGET[cfg.rollout.env]
    value = (cfg.rollout.env_settings or {}).get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"'rollout.env_settings.{key}': must be an integer, got {value!r}")
    return f"rollout.env_settings.{key}", value


def check_microbatch_budget(cfg: Config, prompt_extra: tuple[str, int] | None = None) -> None:
    """`train.max_tokens_per_microbatch` holds the longest sequence: the longest prompt (plus `prompt_extra`,
    (what, tokens) the environment adds to every prompt) and the longest response, padded for CP."""
    t = cfg.train
    response_key, response_tokens = longest_response(cfg)
    extra_key, extra_tokens = prompt_extra or ("", 0)
    longest = cfg.data.max_prompt_tokens + extra_tokens + response_tokens
    cp_multiple = 2 * cfg.parallel.context if cfg.parallel.context > 1 else 1
    padded_longest = -(-longest // cp_multiple) * cp_multiple
    if t.max_tokens_per_microbatch and t.max_tokens_per_microbatch < padded_longest:
        raise ConfigError(
            f"'train.max_tokens_per_microbatch': {t.max_tokens_per_microbatch} cannot hold the longest "
            f"sequence, data.max_prompt_tokens + "
            + (f"{extra_key} ({extra_tokens} tokens) + " if extra_tokens else "")
            + f"{response_key} = {longest}"
            + (
                f", padded to a multiple of 2 x parallel.context = {cp_multiple}: {padded_longest}"
                if cp_multiple > 1
                else ""
            )
        )


def _multi_turn_replay_problem(choice: str, env: str) -> str:
    return (
        f"'algorithm.routing_replay': {choice} cannot run with rollout.env={env}: a multi-turn trajectory's "
        "routed experts are not carried across turns (each turn's engine routing covers that turn's request "
        "alone, and the environment's tokens were never routed by the engine), so the trainer would have no "
        "routing to replay for most positions; set algorithm.routing_replay=off (docs/environments.md)"
    )


def routing_replay_on(cfg: Config, model: Any) -> bool:
    """Whether the engines record routing and the trainer replays it, for the model of HF config `model`;
    raises ConfigError naming algorithm.routing_replay where replay cannot run."""
    choice = cfg.algorithm.routing_replay
    moe = is_moe(model)
    if choice == "replay" and not moe:
        raise ConfigError(
            f"'algorithm.routing_replay': replay, but {cfg.model.path} is a dense model (no router to replay); "
            "leave it unset or set off"
        )
    replay = moe and choice != "off"
    if replay and cfg.rollout.engine == "vllm":
        raise ConfigError(
            "'algorithm.routing_replay': "
            + ("replay" if choice else "unset (= replay for this MoE model)")
            + " cannot run with rollout.engine=vllm: the vllm engine does not return the experts it routed to "
            "(docs/models.md, \"Routing replay\"); use rollout.engine=sglang or local, or set "
            "algorithm.routing_replay=off"
        )
    if replay and cfg.rollout.env in typing.get_args(MultiTurnEnvName):
        raise ConfigError(
            _multi_turn_replay_problem(choice or "unset (= replay for this MoE model)", cfg.rollout.env)
        )
    return replay


def validate_parallel(
    cfg: Config, world_size: int, model: Any = None, *, transformer_engine: bool = False
) -> int:
    """Check the parallel layout against the world size and, given `model` (its HF config), against what
    Megatron splits over the ranks; return the data-parallel size. Runs before Megatron starts, so a bad
    layout is an error naming the key rather than a traceback from inside Megatron. `transformer_engine`:
    the model will run Transformer Engine's layers (a GPU that has it)."""
    t, p = cfg.train, cfg.parallel
    if p.context > 1 and transformer_engine and cfg.model.dtype == "float32":
        raise ConfigError(
            "'model.dtype': float32 with parallel.context > 1 on GPUs: Transformer Engine's context-parallel "
            "attention runs only its flash and fused kernels, which take bf16 or fp16 (use auto or bfloat16)"
        )
    mp = p.tensor * p.pipeline * p.context
    if world_size % mp:
        raise ConfigError(
            f"'parallel.tensor' x 'parallel.pipeline' x 'parallel.context' = {p.tensor} x {p.pipeline} x "
            f"{p.context} = {mp} does not divide the world size {world_size}"
        )
    for hf_key, key in _SPLIT_BY.items():
        size, value = getattr(p, key.split(".")[1]), getattr(model, hf_key, None)
        if isinstance(value, int) and value % size:
            raise ConfigError(
                f"'{key}': {size} does not divide the model's {hf_key} = {value} ({cfg.model.path}); "
                f"Megatron splits it evenly over the {size} ranks"
            )
    _validate_expert_layout(cfg, world_size, model)
    if model is not None:
        routing_replay_on(cfg, model)
    dp = world_size // mp
    seqs_per_update = t.groups_per_update * t.responses_per_prompt
    if seqs_per_update % dp:
        raise ConfigError(
            f"'train.groups_per_update': {t.groups_per_update} x train.responses_per_prompt="
            f"{t.responses_per_prompt} = {seqs_per_update} sequences per update is not divisible by the "
            f"data-parallel size {dp}"
        )
    return dp


def reference_markdown() -> str:
    """The config reference table for docs/training.md, generated from the help strings."""
    lines = []
    for section, cls in _sections().items():
        lines += [f"### `{section}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = choices_of(hints[f.name])
            extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
            lines.append(f"| `{section}.{f.name}` | `{default!r}` | {f.metadata['help']}.{extra} |")
        lines.append("")
    return "\n".join(lines)
