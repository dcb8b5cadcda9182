"""Metrics: TensorBoard scalars/histograms written by MetricsLogger read back, and `m2po plot` draws them."""

from __future__ import annotations

import math

import pytest

from megatron_m2po.commands.m2po import main as cli_main
from megatron_m2po.commands.plot import plot_run
from megatron_m2po.metrics import MetricsLogger, gpu_peak_flops, mfu, read_histogram_tags, read_scalars


def test_scalars_and_histograms_round_trip(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=3, console="none")
    for step in range(1, 4):
        m.log(step, {"rollout/reward_mean": 0.1 * step, "loss/m2_before": 0.01, "train/staleness_mean": 2.0})
        m.histogram(step, "train/staleness", [0, 1, 2, 2])
    m.close()
    series = read_scalars(tmp_path)
    assert [s for s, _ in series["rollout/reward_mean"]] == [1, 2, 3]
    assert math.isclose(series["rollout/reward_mean"][-1][1], 0.3, rel_tol=1e-6)
    assert "train/staleness" in read_histogram_tags(tmp_path)


def test_unknown_namespace_is_refused(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=1, console="none", backends=())
    with pytest.raises(ValueError, match="'reward_mean' is outside the namespaces"):
        m.log(1, {"reward_mean": 1.0})


def test_resumed_run_overwrites_redone_steps(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=4, console="none")
    for step in (1, 2, 3):
        m.log(step, {"train/lr": float(step)})
    m.close()
    m = MetricsLogger(tmp_path, total_steps=4, start_step=2, console="none")
    for step in (3, 4):
        m.log(step, {"train/lr": 10.0 * step})
    m.close()
    assert read_scalars(tmp_path)["train/lr"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_plot_cli_writes_png(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=2, console="none")
    for step in (1, 2):
        m.log(step, {"rollout/reward_mean": step / 2, "loss/masked_fraction": 0.01, "perf/time_train": 1.0})
    m.close()
    assert cli_main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_events_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_run(tmp_path)


def test_peak_flops_by_gpu_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Tesla T4") is None  # unknown card: no MFU rather than a wrong one
    assert gpu_peak_flops(None) is None  # CPU


def test_mfu_estimate():
    assert mfu(1_000_000, 1000.0, 1, None) is None
    assert math.isclose(mfu(10**9, 1e4, 8, 989e12), 6e13 / (8 * 989e12))
