"""RolloutManager: groups scored and queued, bounded-mode producer under the queue's staleness rule, data state."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer

from megatron_m2po.data.prompts import PromptDataset
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.queue import ReplayQueue
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.manager import RolloutManager
from megatron_m2po.rollout.rewards import RewardPool
from megatron_m2po.types import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
PARAMS = SamplingParams(max_new_tokens=5, temperature=1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mgr")
    hf_dir = make_tiny_model("qwen3", root / "model", seed=4)
    data = root / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(12))
    )
    pool = RewardPool("rewards_helpers:length_parity_reward", workers=1, timeout=10)
    yield hf_dir, data, pool
    pool.close()


def make_manager(hf_dir, data, pool, queue, engines=2):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    dataset = PromptDataset(data, tok, seed=0)
    farm = EngineFarm([LocalEngine(hf_dir, engine_id=f"e{i}", seed=i) for i in range(engines)])
    return RolloutManager(dataset, farm, pool, queue, responses_per_prompt=3, sampling=PARAMS), dataset


def test_generate_batch_scores_every_sample(setup):
    hf_dir, data, pool = setup
    manager, dataset = make_manager(hf_dir, data, pool, queue=None)
    try:
        groups = manager.generate_batch(4, version=0)
        assert len({g.prompt_id for g in groups}) == 4
        for g in groups:
            prompt = next(p for p in dataset if g.prompt_id.startswith(p.prompt_id + "@"))
            assert g.answer == prompt.answer and g.prompt_ids == prompt.prompt_ids
            assert [s.group_index for s in g.samples] == [0, 1, 2]
            assert all(s.reward == float(len(s.response_text) % 2) for s in g.samples)
        m = manager.metrics()
        assert m["rollout/groups"] == 4 and m["rollout/responses_per_group"] == 3
        assert manager.state_dict() == dataset.state_dict()  # nothing in flight
    finally:
        manager.stop()


def test_bounded_producer_respects_staleness_and_resumes_without_loss(setup, tmp_path):
    hf_dir, data, pool = setup
    queue = ReplayQueue(
        "bounded", max_staleness=1, groups_per_update=2, capacity=16, journal_dir=tmp_path / "j"
    )
    manager, _ = make_manager(hf_dir, data, pool, queue)
    manager.start()
    consumed = []
    try:
        for version in range(3):
            batch = queue.get_batch(2, timeout=60)
            assert len(batch) == 2
            assert all(version - g.min_version <= 1 for g in batch)
            consumed += [g.prompt_id for g in batch]
            for e in manager.farm.engines:  # engines follow the trainer (a real run syncs weights here)
                e._version = version + 1
            manager.farm._version = version + 1
            queue.publish_version(version + 1)
        time.sleep(0.3)
        committed = queue.commit()
        state = manager.state_dict()
    finally:
        manager.stop()
    assert len(set(consumed)) == 6
    assert queue.metrics()["queue/dropped"] == 0
    accepted = queue.accepted_prompt_ids()
    queue.close()
    # resume: replay the journal, restart data at the saved position; every prompt appears once overall
    queue2 = ReplayQueue.recover(
        tmp_path / "j", committed, mode="bounded", max_staleness=1, groups_per_update=2, capacity=16
    )
    manager2, _ = make_manager(hf_dir, data, pool, queue2, engines=1)
    manager2.load_state_dict(state)
    try:
        replayed = [g.prompt_id for g in queue2.get_batch(len(queue2), timeout=5)] if len(queue2) else []
        fresh = [g.prompt_id for g in manager2.generate_batch(3)]
    finally:
        manager2.stop()
    seen = consumed + replayed + fresh
    assert len(seen) == len(set(seen)), "a prompt was produced twice across the restart"
    assert set(replayed) == accepted - set(consumed)
    # no prompt before the resumed position was lost: the epoch-0 stream is a prefix without gaps
    order = [
        p.prompt_id
        for p in PromptDataset(data, AutoTokenizer.from_pretrained(hf_dir), seed=0).next_prompts(36)
    ]
    assert set(seen) == set(order[: len(seen)])
