"""End to end: `python -m megatron_m2po train` on a tiny model with the local engine, real queue journal,
real Megatron checkpoints; then the event files are read back, and runs are resumed and killed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_m2po.metrics import read_histogram_tags, read_scalars
from megatron_m2po.trackers.mlflow_tracker import mlflow_name
from tests.conftest import REPO, subprocess_env, torchrun_prefix
from tests.tracker_records import mlflow_run, wandb_config, wandb_history

REQUIRED_TAGS = (
    "rollout/reward_mean",
    "rollout/accuracy",
    "rollout/response_length_mean",
    "loss/value",
    "loss/m2_before",
    "loss/m2_after",
    "loss/masked_fraction",
    "loss/ratio_p50",
    "loss/kl_k3",
    "loss/entropy",
    "train/grad_norm",
    "train/lr",
    "train/staleness_mean",
    "train/staleness_max",
    "queue/depth",
    "queue/dropped",
    "perf/gen_tokens_per_s",
    "perf/train_tokens_per_s",
    "perf/time_generate",
    "perf/time_wait",
    "perf/time_train",
    "perf/time_sync",
    "perf/time_step",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_m2po.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("e2e")
    model = make_tiny_model("qwen3", root / "tiny")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"problem": f"{a}+{b}", "answer": str(a + b)}) + "\n"
            for a in range(10)
            for b in range(8)
        )
    )
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {model}}}
data: {{path: {prompts}, apply_chat_template: true, max_prompt_tokens: 64}}
rollout: {{max_new_tokens: 8, reward_fn: "tests.e2e_rewards:odd_char_fraction", reward_workers: 1}}
algorithm: {{loss: m2po, m2_budget: 0.04}}
staleness: {{mode: fixed, fixed_lag_steps: 1}}
train: {{steps: 3, groups_per_step: 2, groups_per_update: 1, responses_per_prompt: 4, micro_batch_size: 4,
         lr: 1.0e-4, torch_threads: 1}}
checkpoint: {{save_every: 1, keep_last: 2}}
logging: {{console: none}}
""")
    return root, recipe


def train_cmd(
    recipe: Path, run_dir: Path, *overrides: str, resume: bool = False, nproc: int = 1
) -> list[str]:
    args = ["--config", str(recipe), f"logging.run_dir={run_dir}", *overrides] + (
        ["--resume"] if resume else []
    )
    if nproc == 1:
        return [sys.executable, "-m", "megatron_m2po", "train", *args]
    # as a module: a script path would put megatron_m2po/ first on sys.path (its platform.py)
    return [*torchrun_prefix(nproc), "-m", "megatron_m2po", "train", *args]


def env() -> dict[str, str]:
    return subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def run_train(recipe, run_dir, *overrides, resume=False, nproc=1, timeout=400):
    proc = subprocess.run(
        train_cmd(recipe, run_dir, *overrides, resume=resume, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=REPO,
    )
    if proc.returncode != 0:
        pytest.fail(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def consumed(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "consumed.jsonl").read_text().splitlines() if ln.strip()]


def assert_metrics_logged(run_dir: Path, steps: int) -> dict:
    series = read_scalars(run_dir)
    missing = [t for t in REQUIRED_TAGS if t not in series]
    assert not missing, f"tags not logged: {missing}"
    for tag in REQUIRED_TAGS:
        assert [s for s, _ in series[tag]] == list(range(1, steps + 1)), tag
        assert all(math.isfinite(v) for _, v in series[tag]), tag
    assert "train/staleness" in read_histogram_tags(run_dir)
    return series


def test_benchmarks_by_name_and_every_tracker_in_a_training_run(setup):
    """eval.benchmarks names shipped sets: each is scored before the first step and after the last, under
    its own `eval/<set>/` tags, and `eval/accuracy` is their mean (the figure the console shows). Every
    tracker of logging.backends (wandb offline, MLflow to its local store) gets the same scalars as
    TensorBoard, and the run's config."""
    root, recipe = setup
    run_dir = root / "eval_by_name"
    sets = ["gsm8k", "amc23"]
    run_train(
        recipe,
        run_dir,
        "staleness.mode=sync",
        "staleness.fixed_lag_steps=0",
        "train.steps=1",
        f"eval.benchmarks=[{','.join(sets)}]",
        "eval.every=1",
        "eval.max_prompts=2",
        "logging.backends=[tensorboard,wandb,mlflow]",
        "logging.wandb_mode=offline",
    )
    series = read_scalars(run_dir)
    for name in sets:
        for metric in ("accuracy", "reward_mean", "response_length_mean"):
            assert [s for s, _ in series[f"eval/{name}/{metric}"]] == [0, 1], (name, metric)
    for step in (0, 1):
        mean = sum(dict(series[f"eval/{name}/accuracy"])[step] for name in sets) / len(sets)
        assert dict(series["eval/accuracy"])[step] == pytest.approx(mean)
    assert all(v > 0 for _, v in series["eval/gsm8k/response_length_mean"])

    wandb_rows = wandb_history(run_dir)
    client, mlflow = mlflow_run(run_dir)
    assert set(mlflow.data.metrics) == {mlflow_name(tag) for tag in series}
    for tag, points in series.items():  # TensorBoard stores float32: equal to 1e-6
        steps, values = [p[0] for p in points], pytest.approx([p[1] for p in points], rel=1e-6)
        history = client.get_metric_history(mlflow.info.run_id, mlflow_name(tag))
        assert [m.step for m in history] == steps and [m.value for m in history] == values, tag
        assert [wandb_rows[step][tag] for step in steps] == values, tag
    assert wandb_rows[1]["train/staleness/_type"] == "histogram"
    assert wandb_config(run_dir)["eval"]["benchmarks"] == sets
    assert mlflow.data.params["eval.benchmarks"] == str(sets)


def test_fixed_mode_end_to_end_lag_is_exact_and_resume_continues_exactly(setup):
    root, recipe = setup
    full = root / "fixed"
    run_train(recipe, full)
    series = assert_metrics_logged(full, 3)
    assert any(v > 0 for _, v in series["train/grad_norm"])
    # The paper's protocol: K=1 batch in the FIFO, u=2 updates per step, so s = 2; the first
    # batches come from the base model (version 0): producing version = max(0, v - s) exactly.
    records = consumed(full)
    assert [r["version"] for r in records] == list(range(6))
    for r in records:
        step_start = (r["step"] - 1) * 2
        for _, produced in r["groups"]:
            assert produced == max(0, step_start - 2), r
    ckpts = sorted(p.name for p in (full / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000003"]  # keep_last=2
    assert (full / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # Resume from step 2 (as after a crash during step 3): the journal replays the FIFO, so step 3
    # trains on the same groups with the same loss as the uninterrupted run.
    part = root / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000003")
    (part / "checkpoints" / "latest").write_text("step_00000002\n")
    run_train(recipe, part, "checkpoint.export_hf_at_end=true", resume=True)
    assert consumed(part) == consumed(full)
    a, b = read_scalars(full), read_scalars(part)
    assert any(v > 0 for s, v in a["train/grad_norm"] if s == 3), "step 3 must carry a gradient"
    for tag in ("loss/value", "train/grad_norm", "loss/m2_before", "loss/ratio_p50"):
        assert [s for s, _ in b[tag]] == [1, 2, 3]
        for (sa, va), (sb, vb) in zip(a[tag], b[tag]):
            assert sb == sa and vb == pytest.approx(va, rel=1e-5, abs=1e-7), (tag, sa)
    # The trained policy exported as an HF model dir that transformers loads.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(part / "hf")
    assert sum(p.numel() for p in exported.parameters()) > 0


def journal_rollouts(run_dir: Path) -> list[tuple]:
    """The groups left in the queue journal: prompt id, each sample's tokens, log-probs, versions, reward."""
    from megatron_m2po.queue.codec import decode_group
    from megatron_m2po.queue.journal import scan_journal

    groups = [decode_group(r.payload) for r in scan_journal(run_dir / "queue").records]
    return [
        (g.prompt_id, [(s.response_ids, s.behavior_logprobs, s.versions, s.reward) for s in g.samples])
        for g in groups
    ]


@pytest.mark.slow
def test_same_seed_replays_the_run_and_its_rollouts_differ_between_groups(setup):
    """Two runs with train.seed=0 sample the same rollouts (per-request seeds are reproducible),
    and different groups are not decoded with one noise tape (no seed shared across requests)."""
    root, recipe = setup
    runs = [root / "seed_a", root / "seed_b"]
    for run_dir in runs:
        run_train(recipe, run_dir, "checkpoint.save_every=100")
    a, b = (journal_rollouts(r) for r in runs)
    assert len(a) >= 6 and a == b  # the 6 groups trained on and any produced ahead
    assert consumed(runs[0]) == consumed(runs[1])
    sa, sb = read_scalars(runs[0]), read_scalars(runs[1])
    for tag in ("rollout/reward_mean", "rollout/response_length_mean", "loss/value", "train/grad_norm"):
        assert sa[tag] == sb[tag], tag
    # near-uniform tiny model: a shared noise tape would give every group the same first tokens
    first_tokens = [tuple(s[0][0] for s in samples) for _, samples in a]
    assert len(set(first_tokens)) == len(first_tokens)


@pytest.mark.slow
def test_fixed_mode_overlapped_generation_trains_on_the_same_batches_as_in_line(setup):
    """staleness.overlap_generation: after the first step's fill, each step's new batch is generated while the
    step trains (no generation left in line), yet every batch is exactly s = 2 updates old and both runs consume
    and journal the same rollouts with the same losses."""
    root, recipe = setup
    on, off = root / "overlap_on", root / "overlap_off"
    run_train(recipe, on, "staleness.overlap_generation=true")
    run_train(recipe, off, "staleness.overlap_generation=false")
    assert consumed(on) == consumed(off)
    for r in consumed(on):
        assert all(produced == max(0, (r["step"] - 1) * 2 - 2) for _, produced in r["groups"]), r
    assert journal_rollouts(on) == journal_rollouts(off)
    a, b = read_scalars(on), read_scalars(off)
    for tag in ("loss/value", "loss/m2_before", "loss/masked_fraction", "train/staleness_mean"):
        assert [v for _, v in a[tag]] == pytest.approx([v for _, v in b[tag]], rel=1e-6, abs=1e-7), tag
    assert [v for _, v in a["train/staleness_mean"]] == [0.5, 2.5, 2.5]
    assert all(v > 0 for _, v in a["perf/time_generate_overlapped"])
    assert [v == 0 for _, v in a["perf/time_generate"]] == [False, True, True]  # the fill of step 1 only
    assert all(v == 0 for _, v in b["perf/time_generate_overlapped"])
    assert all(v > 0 for _, v in b["perf/time_generate"])


def test_config_errors_are_reported_before_anything_runs(setup):
    root, recipe = setup
    proc = subprocess.run(
        train_cmd(recipe, root / "bad", "algorithm.m2_budgt=0.1"),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "unknown key 'algorithm.m2_budgt'; did you mean 'algorithm.m2_budget'" in proc.stderr
    assert not (root / "bad").exists()


def _journal_accounting(run_dir: Path, recipe_overrides: dict) -> tuple[set[str], list[str], int]:
    """(every prompt id the journal accepted, those still queued after the last checkpoint, how many accepted
    groups the queue dropped as too stale: bounded mode drops and counts them by design, e.g. groups a killed
    run left queued that its resume can no longer train on within max_staleness)."""
    from megatron_m2po.queue import ReplayQueue
    from megatron_m2po.trainer.checkpointing import latest_checkpoint, read_trainer_state

    state = read_trainer_state(latest_checkpoint(run_dir / "checkpoints"))
    q = ReplayQueue.recover(run_dir / "queue", state["queue"], **recipe_overrides)
    try:
        return q.accepted_prompt_ids(), q.queued_prompt_ids(), int(q.metrics()["queue/dropped"])
    finally:
        q.close()


def assert_bounded_invariants(run_dir: Path, steps: int, *, max_staleness: int = 2) -> list[dict]:
    """A bounded-mode run (two groups a step, one per update) after faults: every step trained once, no group
    twice, max_staleness held, every accepted group consumed, still queued or counted as dropped."""
    records = consumed(run_dir)
    assert [r["version"] for r in records] == list(range(2 * steps))
    ids = [pid for r in records for pid, _ in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was consumed twice"
    assert all(r["version"] - produced <= max_staleness for r in records for _, produced in r["groups"])
    accepted, queued, dropped = _journal_accounting(
        run_dir, {"mode": "bounded", "max_staleness": max_staleness, "groups_per_update": 1, "capacity": 1024}
    )
    assert set(ids).isdisjoint(queued) and set(ids) | set(queued) <= accepted
    # the rest were dropped as too stale, each counted (seen in CI: one group after the SIGKILL and resume)
    assert len(accepted - set(ids) - set(queued)) == dropped, "an accepted group was lost"
    return records


def _start(recipe, run_dir, overrides, log: Path, *, resume: bool) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(recipe, run_dir, *overrides, resume=resume),
        env=env(),
        cwd=REPO,
        start_new_session=True,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run_dir / "consumed.jsonl").exists() and any(r["step"] >= step for r in consumed(run_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early ({proc.returncode}): {log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"the trainer did not reach step {step}")


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # helper processes (reward workers) of a killed trainer
    except ProcessLookupError:
        pass


# bounded mode with a background producer, a checkpoint every 2 of 6 steps (also tests/test_disk_full.py,
# tests/test_train_chaos.py)
BOUNDED_OVERRIDES = [
    "staleness.mode=bounded",
    "staleness.fixed_lag_steps=0",
    "staleness.max_staleness=2",
    "train.steps=6",
    "checkpoint.save_every=2",
]


def test_sigterm_and_kill_9_then_resume_lose_and_repeat_nothing(setup):
    """bounded mode with a background producer: SIGTERM checkpoints and exits; after a resume, SIGKILL mid-run;
    a second resume finishes. Every accepted group is consumed once or still queued; the step count continues."""
    root, recipe = setup
    run_dir, log = root / "killed", root / "killed.log"
    proc = _start(recipe, run_dir, BOUNDED_OVERRIDES, log, resume=False)
    try:
        _wait_for_step(proc, run_dir, 1, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-4000:]
    finally:
        _reap(proc)
    stopped_at = max(r["step"] for r in consumed(run_dir))
    assert stopped_at < 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"

    proc = _start(recipe, run_dir, BOUNDED_OVERRIDES, log, resume=True)
    try:
        _wait_for_step(proc, run_dir, min(stopped_at + 2, 5), log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        _reap(proc)
    run_train(recipe, run_dir, *BOUNDED_OVERRIDES, resume=True)

    records = assert_bounded_invariants(run_dir, 6)
    assert [r["step"] for r in records] == [
        s for s in range(1, 7) for _ in range(2)
    ]  # the step count continued
    assert_metrics_logged(run_dir, 6)


@pytest.mark.dist
def test_two_processes_tp2_trains_checkpoints_and_resumes(setup):
    root, recipe = setup
    run_dir = root / "tp2"
    run_train(recipe, run_dir, "parallel.tensor=2", "train.steps=2", nproc=2)
    run_train(recipe, run_dir, "parallel.tensor=2", "train.steps=3", resume=True, nproc=2)
    assert_metrics_logged(run_dir, 3)
    assert [r["version"] for r in consumed(run_dir)] == list(range(6))


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_cp2_packed_trains_checkpoints_and_resumes(setup):
    """Context parallelism through the real entry point: packed micro-batches cut over two CP ranks, the
    trainer's behaviour log-probs gathered back, the weight sync from CP rank 0, a checkpoint and its resume."""
    root, recipe = setup
    run_dir = root / "cp2"
    settings = ("parallel.context=2", "train.pack_sequences=true", "rollout.behavior_logprobs=trainer")
    run_train(recipe, run_dir, *settings, "train.steps=2", nproc=2)
    run_train(recipe, run_dir, *settings, "train.steps=3", resume=True, nproc=2)
    assert_metrics_logged(run_dir, 3)
    assert [r["version"] for r in consumed(run_dir)] == list(range(6))


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_dp2_with_trainer_logprobs(setup):
    root, recipe = setup
    run_dir = root / "dp2"
    run_train(recipe, run_dir, "train.steps=2", "rollout.behavior_logprobs=trainer", nproc=2)
    run_train(recipe, run_dir, "train.steps=3", "rollout.behavior_logprobs=trainer", resume=True, nproc=2)
    assert_metrics_logged(run_dir, 3)


ALL_CORRECTIONS = "[token_tis,token_mis,icepop,seq_geo_mask,seq_product_mask]"
MASKS = "[icepop,seq_geo_mask,seq_product_mask]"


def _assert_corrections_logged(run_dir: Path, rules: list[str], steps: int) -> dict:
    """Every rule's masked fraction and rho's statistics each step; the kept and dropped shares add up."""
    series = read_scalars(run_dir)
    for step in range(1, steps + 1):
        at = {tag: dict(points).get(step) for tag, points in series.items()}
        dropped = [at[f"loss/correction_{r}_masked_fraction"] for r in rules]
        assert all(v is not None and 0 <= v <= 1 for v in dropped), (step, dropped)
        assert at["loss/correction_kept_fraction"] + sum(dropped) == pytest.approx(1, abs=1e-5)
        assert at["loss/correction_ratio_max"] >= 1 / at["loss/correction_inverse_ratio_max"]
    return series


@pytest.mark.parametrize(
    "mode",
    [
        ["staleness.mode=fixed"],
        pytest.param(["staleness.mode=sync", "staleness.fixed_lag_steps=0"], marks=pytest.mark.slow),
    ],
)
def test_rollout_corrections_with_trainer_behaviour_compare_trainer_and_engine(setup, mode):
    """sync / fixed with rollout.behavior_logprobs=trainer: every rule at once, rho = mu_trainer / mu_engine.
    The local engine runs the trainer's weights in fp32, so rho is 1 up to kernel noise and nothing is dropped
    by the wide bands."""
    root, recipe = setup
    run_dir = root / f"corrections_{mode[0].split('=')[1]}"
    run_train(
        recipe,
        run_dir,
        *mode,
        "train.steps=2",
        "rollout.behavior_logprobs=trainer",
        f"algorithm.rollout_corrections={ALL_CORRECTIONS}",
        "algorithm.geo_mask_low=0.99",
        "algorithm.geo_mask_high=1.01",
    )
    series = _assert_corrections_logged(run_dir, ALL_CORRECTIONS[1:-1].split(","), 2)
    for _, value in series["loss/correction_ratio_max"] + series["loss/correction_inverse_ratio_max"]:
        assert value == pytest.approx(1, abs=1e-3)
    assert all(v == 0 for _, v in series["loss/correction_icepop_masked_fraction"])
    assert all(v == pytest.approx(1, abs=1e-3) for _, v in series["loss/correction_token_tis_weight_mean"])


@pytest.mark.slow
def test_a_bf16_engine_against_the_fp32_trainer_is_what_the_corrections_see(setup):
    """rollout.local_dtype=bfloat16: the engine's probabilities drift from the fp32 trainer's; rho moves off 1
    (where the fp32 engine's stays within 1e-3, above) and an IcePop band of 1e-3 drops tokens."""
    root, recipe = setup
    run_dir = root / "corrections_bf16_engine"
    run_train(
        recipe,
        run_dir,
        "train.steps=2",
        "rollout.local_dtype=bfloat16",
        "rollout.behavior_logprobs=trainer",
        "algorithm.rollout_corrections=[icepop,token_tis]",
        "algorithm.icepop_low=0.999",
        "algorithm.icepop_high=1.001",
    )
    series = _assert_corrections_logged(run_dir, ["icepop", "token_tis"], 2)
    spread = [
        max(a, b)
        for (_, a), (_, b) in zip(
            series["loss/correction_ratio_max"], series["loss/correction_inverse_ratio_max"]
        )
    ]
    assert all(v > 1.001 for v in spread), spread
    assert all(v > 0 for _, v in series["loss/correction_icepop_masked_fraction"])


def test_rollout_masks_in_bounded_mode_compare_the_policy_before_the_update_and_the_engine(setup):
    """bounded: only the masks, on rho = pi_old / mu_engine (staleness and mismatch together); a band too
    tight for any stale token drops tokens, and the run trains on the rest."""
    root, recipe = setup
    run_dir = root / "corrections_bounded"
    run_train(
        recipe,
        run_dir,
        *BOUNDED_OVERRIDES[:3],
        "train.steps=4",
        f"algorithm.rollout_corrections={MASKS}",
        "algorithm.icepop_low=0.999",
        "algorithm.icepop_high=1.001",
    )
    series = _assert_corrections_logged(run_dir, MASKS[1:-1].split(","), 4)
    stale = [v for _, v in series["train/staleness_max"]]
    dropped = [v for _, v in series["loss/correction_icepop_masked_fraction"]]
    assert any(s > 0 for s in stale), stale
    assert all(d > 0 for s, d in zip(stale, dropped) if s > 0), (stale, dropped)


@pytest.mark.parametrize(
    "mode",
    [
        ["staleness.mode=fixed"],
        pytest.param(["staleness.mode=sync", "staleness.fixed_lag_steps=0"], marks=pytest.mark.slow),
        pytest.param(BOUNDED_OVERRIDES[:3], marks=pytest.mark.slow),
    ],
)
def test_overlong_filtering_and_soft_punishment_in_a_run(setup, mode):
    """Responses cut at max_new_tokens (8) leave the loss, and the soft punishment over the last 4 tokens
    lowers the training reward: each update reports both on the batch it consumed."""
    root, recipe = setup
    run_dir = root / f"overlong_{mode[0].split('=')[1]}"
    run_train(
        recipe,
        run_dir,
        *mode,
        "train.steps=2",
        "algorithm.overlong_filtering=true",
        "algorithm.overlong_buffer=4",
    )
    series = read_scalars(run_dir)
    filtered = dict(series["train/overlong_filtered_fraction"])
    truncated = dict(series["rollout/truncated_fraction"])
    assert sorted(filtered) == [1, 2]
    assert any(v > 0 for v in truncated.values()), truncated  # the tiny model runs into the limit
    for step in filtered:
        assert filtered[step] == pytest.approx(truncated[step], abs=1e-6)
    # a truncated response (8 tokens, L_max - L_cache = 4) costs exactly -1
    assert all(-1 <= v <= -truncated[s] + 1e-6 for s, v in series["train/overlong_penalty_mean"])


DYNAMIC_SAMPLING = [
    "rollout.dynamic_sampling=true",
    "rollout.reward_fn=tests.e2e_rewards:checksum_parity",  # binary: half of the 2-response groups are flat
    "train.responses_per_prompt=2",
]


@pytest.mark.parametrize(
    "mode",
    [
        ["staleness.mode=fixed"],
        pytest.param(["staleness.mode=sync", "staleness.fixed_lag_steps=0"], marks=pytest.mark.slow),
        BOUNDED_OVERRIDES[:3],
    ],
)
def test_dynamic_sampling_trains_only_on_groups_whose_rewards_vary(setup, mode):
    """Flat groups are dropped before the queue and replaced: every consumed batch has no zero-advantage group,
    the drops are counted, and the mode's promise still holds (fixed: the exact lag; bounded: the bound)."""
    root, recipe = setup
    run_dir = root / f"dynamic_sampling_{mode[0].split('=')[1]}"
    run_train(recipe, run_dir, *mode, *DYNAMIC_SAMPLING)
    series = read_scalars(run_dir)
    assert [v for _, v in series["rollout/zero_advantage_group_fraction"]] == [0.0] * 3
    kept = series["rollout/dynamic_sampling_kept_groups"][-1][1]
    dropped = series["rollout/dynamic_sampling_dropped_groups"][-1][1]
    surplus = series["rollout/dynamic_sampling_surplus_groups"][-1][1]
    assert dropped > 0, "no flat group was met: the test does not exercise dropping"
    judged = kept + dropped + surplus
    # every generated group is judged (in bounded mode the producer may finish one between the two reads)
    assert series["rollout/groups"][-1][1] - judged in ((0,) if mode[0] != BOUNDED_OVERRIDES[0] else (0, 1))
    assert series["rollout/samples_per_kept_group"][-1][1] == pytest.approx(2 * judged / kept)
    records = consumed(run_dir)
    ids = [pid for r in records for pid, _ in r["groups"]]
    assert len(ids) == len(set(ids)) == 6
    for r in records:
        for _, produced in r["groups"]:
            if mode[0] == "staleness.mode=fixed":  # s = 2: the refill came from the same version
                assert produced == max(0, (r["step"] - 1) * 2 - 2), r
            else:
                assert r["version"] - produced <= 2, r


@pytest.mark.parametrize(
    "mode",
    [
        BOUNDED_OVERRIDES[:3],
        pytest.param(["staleness.mode=sync", "staleness.fixed_lag_steps=0"], marks=pytest.mark.slow),
    ],
)
def test_a_run_whose_prompts_saturated_stops_with_a_named_error(setup, mode):
    """Every reward 0: no group can be kept; the run ends (status 1) naming PromptsSaturated and the cap."""
    root, recipe = setup
    run_dir = root / f"saturated_{mode[0].split('=')[1]}"
    proc = subprocess.run(
        train_cmd(
            recipe,
            run_dir,
            *mode,
            *DYNAMIC_SAMPLING[:1],
            "rollout.reward_fn=tests.e2e_rewards:always_zero",
            "train.responses_per_prompt=2",
            "rollout.dynamic_sampling_max_oversampling=3",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "PromptsSaturated: dynamic sampling generated" in proc.stderr
    assert "rollout.dynamic_sampling_max_oversampling=3" in proc.stderr
    assert not (run_dir / "consumed.jsonl").exists() or not consumed(run_dir)


@pytest.mark.slow
def test_dynamic_sampling_in_bounded_mode_survives_kill_9_without_loss_or_repeats(setup):
    """SIGKILL mid-run with dynamic sampling, then --resume: no group is consumed twice, no accepted group is
    lost (consumed, still queued, or counted as too stale), and the journal holds no group with flat rewards."""
    from megatron_m2po.queue.codec import decode_group
    from megatron_m2po.queue.journal import scan_journal
    from megatron_m2po.rollout.dynamic_sampling import reward_std

    root, recipe = setup
    run_dir, log = root / "dynamic_sampling_killed", root / "dynamic_sampling_killed.log"
    overrides = [*BOUNDED_OVERRIDES, *DYNAMIC_SAMPLING]
    proc = _start(recipe, run_dir, overrides, log, resume=False)
    try:
        _wait_for_step(proc, run_dir, 3, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        _reap(proc)
    run_train(recipe, run_dir, *overrides, resume=True)
    records = consumed(run_dir)
    assert [r["version"] for r in records] == list(range(12))
    ids = [pid for r in records for pid, _ in r["groups"]]
    assert len(ids) == len(set(ids)), "a group was consumed twice"
    assert all(r["version"] - produced <= 2 for r in records for _, produced in r["groups"])
    accepted, queued, dropped = _journal_accounting(
        run_dir, {"mode": "bounded", "max_staleness": 2, "groups_per_update": 1, "capacity": 1024}
    )
    assert set(ids).isdisjoint(queued) and set(ids) | set(queued) <= accepted
    assert len(accepted - set(ids) - set(queued)) == dropped, "an accepted group was lost"
    journaled = [decode_group(r.payload) for r in scan_journal(run_dir / "queue").records]
    assert journaled and all(reward_std(g) > 0 for g in journaled)
    assert all(v == 0 for _, v in read_scalars(run_dir)["rollout/zero_advantage_group_fraction"])
