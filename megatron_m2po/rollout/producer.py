"""Rank 0's rollout side as the loop sees it: `generate` (or `start_generation` / `finish_generation`), `put`,
`take`, `start`, metrics, evaluation, state.

Holds the prompts, the engine farm, the rewards and the rollout manager (docs/rollout.md), and the replay
queue with its journal (docs/queue.md), so that `train.py` reads as the algorithm. The journal lives in
`run_dir/queue`; its commit point is saved in each checkpoint, so `--resume` replays exactly the
groups accepted but not consumed by that checkpoint, and the manager skips their prompts.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from megatron_m2po.config import Config
from megatron_m2po.models.hf_config import hf_config_dir
from megatron_m2po.queue import ReplayQueue
from megatron_m2po.queue.journal import remove_journal
from megatron_m2po.rollout.build import (
    dynamic_sampling,
    engine_farm,
    environment,
    prompt_dataset,
    queue_kwargs,
    reward_pool,
    sampling_params,
)
from megatron_m2po.rollout.evaluation import (
    FULL_REWARD,
    FileSpec,
    environment_eval_metrics,
    generate_all,
    open_dataset,
    rollout_all,
    stop_token_ids,
)
from megatron_m2po.rollout.manager import RolloutManager
from megatron_m2po.rollout.stops import ProducerStopped
from megatron_m2po.types import Group

logger = logging.getLogger(__name__)

# Held-out prompts in flight during `eval.every`'s evaluation: enough that a local engine decodes them in a
# few large batches (8 at a time took 38 rounds for the CPU demo's 300 prompts), few enough for any server.
EVAL_CONCURRENCY = 64
# Per-problem correctness of every evaluation, appended under run_dir: paired comparisons between runs
# scored on the same problems need which problems each got right, not only how many.
EVAL_RECORD = "eval_correct.csv"


class Producer:
    def __init__(self, cfg: Config, trainer, run_dir: Path, *, saved: dict[str, Any] | None):
        self.cfg = cfg
        self.eval_record = run_dir / EVAL_RECORD
        hf_dir = str(hf_config_dir(cfg.model.path))  # a Megatron checkpoint keeps its HF files in `hf/`
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        journal = run_dir / "queue"
        kwargs = queue_kwargs(cfg, journal)
        if saved is not None:
            kwargs.pop("journal_dir")
            self.queue = ReplayQueue.recover(journal, saved["queue"], **kwargs)
        else:
            if journal.exists():
                logger.warning("fresh run: removing the old queue journal's files in %s", journal)
                for other in remove_journal(journal):
                    logger.warning("fresh run: %s is not the journal's: left as it is", other)
            self.eval_record.unlink(missing_ok=True)  # a fresh run's evaluations are its own
            self.queue = ReplayQueue(**kwargs)
        self.farm = engine_farm(cfg, hf_dir, trainer.dtype, routed_experts=trainer.routed_experts_shape)
        self.rewards = reward_pool(cfg)
        sampling = sampling_params(cfg, stop_token_ids=stop_token_ids(self.tokenizer))
        self.manager = RolloutManager(
            prompt_dataset(cfg, self.tokenizer),
            self.farm,
            self.rewards,
            self.queue,
            responses_per_prompt=cfg.train.responses_per_prompt,
            sampling=sampling,
            max_inflight_groups=cfg.rollout.max_inflight_groups,
            environment=environment(cfg, self.farm, self.rewards, self.tokenizer, sampling),
            dynamic_sampling=dynamic_sampling(cfg),
        )
        if saved is not None:
            self.manager.load_state_dict(saved["data"])
        self._gen_tokens = self._tokens_at_start = 0
        self._gen_seconds = 0.0
        self._pending: tuple[Future, float, list[float]] | None = None  # a started batch (future, start, end)
        self.last_generation_s = 0.0
        self._last_rate: tuple[float, float] | None = None

    # ---- sync / fixed: generation in line with training (or beside it: `start_generation`)
    def generate(self, num_groups: int, version: int) -> list[Group]:
        self.start_generation(num_groups, version)
        return self.finish_generation()

    def start_generation(self, num_groups: int, version: int) -> None:
        """Begin generating `num_groups` groups with the engines at `version`; `finish_generation` returns them."""
        if self._pending is not None:
            raise RuntimeError("start_generation: the previous batch was not finished")
        self._tokens_at_start = self.manager.generated_tokens
        future, done = self.manager.submit_batch(num_groups, version), []
        future.add_done_callback(lambda _: done.append(time.monotonic()))
        self._pending = (future, time.monotonic(), done)

    def finish_generation(self) -> list[Group]:
        """The started batch, once generated; `last_generation_s` is its wall time."""
        if self._pending is None:
            raise RuntimeError("finish_generation: no batch was started")
        future, started, done = self._pending
        try:
            groups = future.result()
        finally:
            self._pending = None
        self.last_generation_s = (done[0] if done else time.monotonic()) - started
        self._gen_seconds += self.last_generation_s
        self._gen_tokens += self.manager.generated_tokens - self._tokens_at_start  # dropped groups' too
        return groups

    def put(self, groups: list[Group]) -> None:
        for g in groups:
            if not self.queue.put(g):
                logger.warning(
                    "group %s was already accepted (duplicate after a restart): not queued again", g.prompt_id
                )

    # ---- bounded: a background producer
    def start(self, version: int) -> None:
        self.queue.publish_version(version)
        self._last_rate = (0.0, time.monotonic())
        self.manager.start()

    # ---- consumer side
    def take(
        self, num_groups: int, *, stop_requested: Callable[[], bool] = lambda: False, poll_s: float = 0.2
    ) -> list[Group] | None:
        """The next `num_groups` groups; None if `stop_requested()` turns true while waiting (SIGTERM).

        Raises `ProducerStopped` with the cause when no producer can deliver them any more (a persistent
        write failure, a crashed producer thread), so the wait never outlives the producer.
        """
        while True:
            groups = self.queue.get_batch(num_groups, timeout=poll_s)
            if groups:
                return groups
            if stop_requested():
                return None
            self.manager.check_alive()
            if not self.manager.started:
                raise ProducerStopped(
                    f"waiting for {num_groups} groups: the queue holds {len(self.queue)}, no producer runs"
                )

    def metrics(self) -> dict[str, float]:
        out = dict(self.queue.metrics())
        out.update(self.rewards.metrics())
        rollout = self.manager.metrics()
        # The manager's running reward mean is over everything generated; the loop logs the consumed batch's.
        out["rollout/generated_reward_mean"] = rollout.pop("rollout/reward_mean", 0.0)
        out.update(rollout)
        tokens = rollout.get("rollout/generated_response_length_mean", 0.0) * rollout.get(
            "rollout/groups", 0.0
        )
        tokens *= rollout.get("rollout/responses_per_group", 0.0)
        now = time.monotonic()
        if self._gen_seconds > 0:  # sync / fixed: tokens over the time spent generating
            out["perf/gen_tokens_per_s"] = self._gen_tokens / self._gen_seconds
        elif self._last_rate is not None and now > self._last_rate[1]:  # bounded: over wall time
            out["perf/gen_tokens_per_s"] = (tokens - self._last_rate[0]) / (now - self._last_rate[1])
        self._last_rate = (tokens, now)
        self._gen_tokens, self._gen_seconds = 0, 0.0
        return out

    def evaluate(self, version: int) -> dict[str, float]:
        """`eval/` metrics: the engines (holding `version`) answer the held-out sets; accuracy = avg@k.

        One set: `eval/accuracy`, ... With several (eval.benchmarks and eval.path), each set's under
        `eval/<set>/`, and `eval/accuracy` is their mean, so the console and plots read one figure.
        A multi-turn `rollout.env` answers through its own turns, as the run's rollouts do (tool_math: with
        the tool, in the run's sandbox pool), and adds its means and fractions (`used_tool_fraction`, ...)."""
        e = self.cfg.eval
        sets = [FileSpec.benchmark(name) for name in e.benchmarks]
        if e.path:
            sets.append(FileSpec(Path(e.path), e.problem_key, e.answer_key, e.answer_format))
        params = replace(self.manager.sampling, temperature=e.temperature, top_p=1.0, top_k=-1)
        n = e.responses_per_prompt
        env = self.manager.environment

        async def run(prompts, env_copy) -> tuple[list, list[float]]:
            if env_copy is not None:
                groups = await rollout_all(env_copy, prompts, n, concurrency=EVAL_CONCURRENCY)
                return groups, [s.reward for g in groups for s in g]
            groups = await generate_all(self.farm, prompts, n, params, concurrency=EVAL_CONCURRENCY)
            texts = [s.response_text for g in groups for s in g]
            return groups, await self.rewards.score_async(
                texts, [p.answer for p in prompts for _ in range(n)]
            )

        t = time.monotonic()
        out: dict[str, float] = {}
        for spec in sets:
            _, prompts = open_dataset(
                spec,
                self.tokenizer,
                template=self.cfg.data.template,
                apply_chat_template=self.cfg.data.apply_chat_template,
                max_prompts=e.max_prompts,
            )
            env_copy = env.for_evaluation(params) if env.multi_turn else None  # this set's own counters
            groups, scores = asyncio.run_coroutine_threadsafe(run(prompts, env_copy), self.farm.loop).result()
            lengths = [len(s.response_ids) for g in groups for s in g]
            correct = [score >= FULL_REWARD for score in scores]
            append_eval_record(self.eval_record, version, spec.label, n, correct)
            prefix = "eval/" if len(sets) == 1 else f"eval/{spec.label}/"
            out[f"{prefix}accuracy"] = sum(correct) / max(1, len(correct))
            out[f"{prefix}reward_mean"] = sum(scores) / max(1, len(scores))
            out[f"{prefix}response_length_mean"] = sum(lengths) / max(1, len(lengths))
            if env_copy is not None:
                out.update({prefix + key: value for key, value in environment_eval_metrics(env_copy).items()})
        if len(sets) > 1:
            out["eval/accuracy"] = sum(out[f"eval/{s.label}/accuracy"] for s in sets) / len(sets)
        out["eval/seconds"] = time.monotonic() - t
        out["eval/version"] = float(version)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Data position + queue commit point (call right before saving the checkpoint)."""
        return {"data": self.manager.state_dict(), "queue": self.queue.commit()}

    def close(self) -> None:
        if self._pending is not None:  # the loop ended mid-generation: its prompts come back on resume
            self._pending[0].cancel()
        try:
            self.manager.stop()
        except Exception as e:  # noqa: BLE001 - closing must not hide the loop's own error
            logger.warning("stopping the rollout manager: %s", e)
        self.rewards.close()
        try:
            self.queue.close()
        except OSError as e:  # a full disk at the final fsync: the loop's own error (if any) matters more
            logger.error("closing the replay queue: %s", e)


def append_eval_record(
    path: Path, version: int, label: str, responses_per_prompt: int, correct: list[bool]
) -> None:
    """One line per evaluation of one set: `version,set,responses_per_prompt,bits`, bits '1'/'0' per
    response in prompt order (a resumed run may repeat a version: its last line is the one that counts)."""
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["version", "set", "responses_per_prompt", "correct"])
        writer.writerow([version, label, responses_per_prompt, "".join("1" if c else "0" for c in correct)])


def read_eval_record(path: Path, label: str | None = None) -> dict[int, str]:
    """version -> the bits of its (last) evaluation of the set `label` (None: the run's only set), from
    `append_eval_record`'s file."""
    out: dict[str, dict[int, str]] = {}
    with Path(path).open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            bits = row.get("correct") or ""
            if set(bits) - {"0", "1"} or not (row.get("version") or "").isdigit():
                raise ValueError(f"{path}, row {line}: not 'version,set,responses_per_prompt,bits'")
            out.setdefault(row["set"], {})[int(row["version"])] = bits
    if label is None and len(out) > 1:
        raise ValueError(f"{path}: evaluations of {sorted(out)}; name the set")
    return out.get(label, {}) if label is not None else next(iter(out.values()), {})
