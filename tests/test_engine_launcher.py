"""EngineLauncher's command lines: which GPUs each server gets."""

from __future__ import annotations

import pytest

from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher


def _server_gpus(launcher: EngineLauncher) -> list[str]:
    return [launcher._server_cmd(i)[1]["CUDA_VISIBLE_DEVICES"] for i in range(launcher.servers)]


def test_servers_use_the_gpus_the_parent_makes_visible(monkeypatch):
    """A single-node split hands the rollout side CUDA_VISIBLE_DEVICES=6,7: the servers must run there, not on
    physical GPUs 0 and 1 (the trainer's)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert _server_gpus(EngineLauncher("m", servers=2, ports=[1, 2])) == ["6", "7"]
    assert _server_gpus(EngineLauncher("m", servers=1, tp=2, ports=[1])) == ["6,7"]
    launcher = EngineLauncher("m", servers=1, ports=[1], env={"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"})
    assert _server_gpus(launcher) == ["GPU-a"]
    with pytest.raises(ValueError, match="need 4 GPUs"):
        EngineLauncher("m", servers=2, tp=2, ports=[1, 2])


def test_servers_default_to_the_first_gpus_without_a_visible_list(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _server_gpus(EngineLauncher("m", servers=2, ports=[1, 2])) == ["0", "1"]
    assert _server_gpus(EngineLauncher("m", servers=2, ports=[1, 2], gpu_ids=[3, 5])) == ["3", "5"]
