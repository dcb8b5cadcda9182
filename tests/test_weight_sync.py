"""Engine log-probs == trainer (Megatron) recomputed log-probs, before and after a weight sync from a trained policy."""

from __future__ import annotations

import asyncio
import importlib.util
import logging

import pytest
import torch

from megatron_m2po.algorithms import vocab_parallel_logprobs
from megatron_m2po.checkpoint import load_policy
from megatron_m2po.models import forward_logits, load_hf_config
from megatron_m2po.models.tiny import make_tiny_model
from megatron_m2po.platform import destroy_distributed, init_distributed
from megatron_m2po.rollout.engines.local import LocalEngine
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.sync import WeightSync, iter_buckets
from megatron_m2po.types import SamplingParams

torch.set_num_threads(1)
T = 0.9
PARAMS = SamplingParams(max_new_tokens=12, temperature=T, top_p=0.95, seed=11)
PROMPTS = [[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]]


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen3_moe"])
def policy(request, tmp_path_factory):
    hf_dir = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    init_distributed()
    model = load_policy(hf_dir, dtype=torch.float32)
    yield hf_dir, model, load_hf_config(hf_dir)
    destroy_distributed()


def trainer_logprobs(model, samples) -> list[torch.Tensor]:
    """The trainer's recompute: one right-padded batch through Megatron, log-probs at temperature T."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    width = max(map(len, seqs))
    device = next(model.parameters()).device
    ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs], device=device)
    with torch.no_grad():
        logits = forward_logits(model, ids).float()
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    lp = vocab_parallel_logprobs(logits, targets, temperature=T).cpu()
    out = []
    for row, s in enumerate(samples):
        p = len(s.prompt_ids)
        out.append(lp[row, p - 1 : p - 1 + len(s.response_ids)])
    return out


def generate(engine, prompts=PROMPTS):
    async def run():
        groups = await asyncio.gather(
            *(engine.generate(f"p{i}", p, 2, PARAMS) for i, p in enumerate(prompts))
        )
        return [s for g in groups for s in g]

    return asyncio.run(run())


def max_diff(samples, ref) -> float:
    return max((torch.tensor(s.behavior_logprobs) - r).abs().max().item() for s, r in zip(samples, ref))


def train_a_little(model, samples, steps=2):
    """A real update: SGD on a policy-gradient-like loss of the sampled tokens, so weights really move."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        seqs = [s.prompt_ids + s.response_ids for s in samples]
        width = max(map(len, seqs))
        ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs])
        logits = forward_logits(model, ids).float()
        targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        loss = -vocab_parallel_logprobs(logits, targets, temperature=T).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_engine_logprobs_equal_trainer_then_after_sync(policy):
    hf_dir, model, hf_config = policy
    engine = LocalEngine(hf_dir, engine_id="e")
    before = generate(engine)
    assert max_diff(before, trainer_logprobs(model, before)) <= 1e-5

    original = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    train_a_little(model, before)
    try:
        moved = trainer_logprobs(model, before)
        assert max_diff(before, moved) > 1e-3  # the update changed the policy: the check below can fail
        sync = WeightSync(model, hf_config, [engine], bucket_bytes=64 << 10)
        metrics = sync.push_collective(version=1)
        sync.close()
        assert metrics["sync/buckets"] > 1 and engine.version == 1
        after = generate(engine)
        assert all(s.versions == [1] * len(s.response_ids) for s in after)
        assert max_diff(after, trainer_logprobs(model, after)) <= 1e-5
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in original:
                    v.copy_(original[k])
        asyncio.run(engine.close())


def test_sender_failing_halfway_publishes_nothing(policy, monkeypatch):
    """The tensors transport when the trainer's gather fails after some buckets went out (through a farm and
    to a bare engine): the engines discard what they staged and serve the old weights and version."""
    import megatron_m2po.sync.weight_sync as weight_sync

    hf_dir, model, hf_config = policy
    engine = LocalEngine(hf_dir, engine_id="e")
    farm_engine = LocalEngine(hf_dir, engine_id="f")
    real = weight_sync.iter_hf_tensors

    def gather_fails_halfway(model, hf_config):
        tensors = list(real(model, hf_config))
        for name, t in tensors[: len(tensors) // 2]:
            yield name, t + 1.0
        raise RuntimeError("a rank's gather failed")

    monkeypatch.setattr(weight_sync, "iter_hf_tensors", gather_fails_halfway)
    before = engine.state_dict()
    outputs = generate(engine)
    try:
        for target in ([engine], EngineFarm([farm_engine])):
            sync = WeightSync(model, hf_config, target, bucket_bytes=16 << 10)
            with pytest.raises(RuntimeError, match="gather failed"):
                sync.push_collective(version=1)
            sync.close()
        assert engine.version == farm_engine.version == 0 and target.version == 0
        for e in (engine, farm_engine):
            assert all(torch.equal(e.state_dict()[k], v) for k, v in before.items())
            assert [s.response_ids for s in generate(e)] == [s.response_ids for s in outputs]
    finally:
        asyncio.run(engine.close())
        asyncio.run(farm_engine.close())


def test_disk_transport_through_farm(policy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="megatron_m2po.sync")
    hf_dir, model, hf_config = policy
    engines = [LocalEngine(hf_dir, engine_id=f"e{i}") for i in range(2)]
    farm = EngineFarm(engines)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sync = WeightSync(model, hf_config, farm, transport="disk", disk_dir=tmp_path, bucket_bytes=32 << 10)
    sync.push_collective(version=5)
    sync.push_collective(version=6)
    sync.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v6"]  # the previous version is cleaned up
    assert len(list((tmp_path / "v6").glob("*.safetensors"))) > 1
    assert farm.version == 6 and all(e.version == 6 for e in engines)
    # one line per push, at DEBUG: a console (INFO) shows the run's progress, not every sync (--verbose does)
    pushes = [r for r in caplog.records if r.getMessage().startswith("weights v")]
    assert [(r.levelno, r.getMessage()[:10]) for r in pushes] == [
        (logging.DEBUG, "weights v5"),
        (logging.DEBUG, "weights v6"),
    ]
    for e in engines:
        out = generate(e, PROMPTS[:1])
        assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5
        asyncio.run(e.close())


def test_iter_buckets_bounds_bytes():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(iter_buckets([*tensors[:2], ("skip", None), *tensors[2:]], bucket_bytes=120))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 120 or len(b) == 1 for b in buckets)
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(tensors, 0))


def gloo_sync(model, hf_config, engine, bucket_bytes: int) -> WeightSync:
    """A WeightSync over the distributed transport (gloo) to one engine server, group connected."""
    from megatron_m2po.net import free_port
    from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster

    broadcaster = DistributedWeightBroadcaster(
        [engine], master_address="127.0.0.1", master_port=free_port(), backend="gloo"
    )
    sync = WeightSync(
        model,
        hf_config,
        [engine],
        transport="distributed",
        broadcaster=broadcaster,
        bucket_bytes=bucket_bytes,
    )
    broadcaster.connect(sync.loop)
    return sync


def test_distributed_transport_to_engine_process(policy, tmp_path):
    """The GPU protocol on CPU: SGLang's /init_weights_update_group + /update_weights_from_distributed to an
    engine process, tensors broadcast over a separate gloo group (NCCL on GPU) from the trainer."""
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

    hf_dir, model, hf_config = policy
    if hf_config.model_type != "qwen3":
        pytest.skip("the transport does not depend on the architecture; one is enough for CI time")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with EngineLauncher(hf_dir, servers=1, backend="local", log_dir=tmp_path) as launcher:
        (engine,) = launcher.engines()
        sync = gloo_sync(model, hf_config, engine, bucket_bytes=64 << 10)
        metrics = sync.push_collective(version=2)
        out = asyncio.run_coroutine_threadsafe(
            engine.generate("q", PROMPTS[0], 2, PARAMS), sync.loop
        ).result()
        asyncio.run_coroutine_threadsafe(engine.close(), sync.loop).result()
        sync.close()
    assert metrics["sync/buckets"] > 1 and engine.version == 2
    assert all(s.versions == [2] * len(s.response_ids) for s in out)
    assert max_diff(out, trainer_logprobs(model, out)) <= 1e-5


def test_restarted_trainer_rejoins_servers_that_stayed_up(policy, tmp_path):
    """A trainer killed before WeightSync.close() leaves its group on the servers (SGLang has no replace path
    and torch refuses a group name in use); the next trainer's group has its own name and joins."""
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher

    hf_dir, model, hf_config = policy
    if hf_config.model_type != "qwen3":
        pytest.skip("the group naming does not depend on the architecture")
    with EngineLauncher(hf_dir, servers=1, backend="local", log_dir=tmp_path) as launcher:
        (first_client,) = launcher.engines()
        dead = gloo_sync(model, hf_config, first_client, bucket_bytes=1 << 20)
        dead.push_collective(version=1)  # then the trainer dies: no close(), the server keeps the group
        (engine,) = launcher.engines()
        sync = gloo_sync(model, hf_config, engine, bucket_bytes=1 << 20)
        sync.push_collective(version=2)
        out = asyncio.run_coroutine_threadsafe(
            engine.generate("q", PROMPTS[0], 1, PARAMS), sync.loop
        ).result()
        assert sync.broadcaster.group_name != dead.broadcaster.group_name
        asyncio.run_coroutine_threadsafe(engine.close(), sync.loop).result()
        sync.close()
    assert engine.version == 2 and out[0].versions == [2] * len(out[0].response_ids)


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None or torch.cuda.device_count() < 2,
    reason="needs sglang and 2 GPUs (NCCL allows one rank per GPU: trainer on cuda:0, server on cuda:1)",
)
def test_nccl_transport_to_real_sglang_server(tmp_path):
    """GPU path: the trainer (cuda:0) broadcasts to a real SGLang server (cuda:1) over NCCL."""
    from megatron_m2po.net import free_port
    from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
    from megatron_m2po.sync.broadcast import DistributedWeightBroadcaster

    hf_dir = make_tiny_model(
        "qwen3",
        tmp_path / "m",
        seed=6,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
    )
    init_distributed()
    try:
        model = load_policy(hf_dir, dtype=torch.float32)
        hf_config = load_hf_config(hf_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        with EngineLauncher(
            hf_dir,
            servers=1,
            gpu_ids=[1],
            log_dir=tmp_path,
            extra_args=["--dtype", "float32", "--mem-fraction-static", "0.3"],
        ) as launcher:
            (engine,) = launcher.engines()
            broadcaster = DistributedWeightBroadcaster(
                [engine], master_address="127.0.0.1", master_port=free_port(), backend="nccl", device="cuda:0"
            )
            sync = WeightSync(model, hf_config, [engine], transport="distributed", broadcaster=broadcaster)
            broadcaster.connect(sync.loop)
            sync.push_collective(version=1)
            params = SamplingParams(max_new_tokens=12, temperature=T)
            out = asyncio.run_coroutine_threadsafe(
                engine.generate("q", PROMPTS[0], 2, params), sync.loop
            ).result()
            asyncio.run_coroutine_threadsafe(engine.close(), sync.loop).result()
            sync.close()
        assert max_diff(out, trainer_logprobs(model, out)) <= 2e-3
    finally:
        destroy_distributed()


@pytest.mark.dist
@pytest.mark.slow  # ~70 s; the EP gather itself is in the default set (tests/test_moe.py, EP = 2)
def test_expert_parallel_sync_to_engine_server(tmp_path):
    """A Qwen3-MoE trained at EP = 2 syncs every expert of both ranks into a CPU engine server, which then
    samples with the trainer's log-probs (tests/dist/moe_weight_sync.py)."""
    from tests.conftest import REPO, run_torchrun

    hf_dir = make_tiny_model("qwen3_moe", tmp_path / "hf", seed=11)
    proc = run_torchrun(REPO / "tests" / "dist" / "moe_weight_sync.py", 2, hf_dir, tmp_path / "logs")
    assert proc.stdout.count("engine at v2 after an EP=2 sync, log-probs match the trainer") == 2
