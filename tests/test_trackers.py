"""The experiment trackers (logging.backends): wandb offline and MLflow to a local file store receive the
same scalars as TensorBoard, the run's config and the git commit, read back with their own formats and
clients; a tracker that cannot start is a named error; one that fails mid-run is logged once and counted."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import subprocess

import pytest

from megatron_m2po.config import Config, LoggingConfig
from megatron_m2po.metrics import MetricsLogger, read_scalars
from megatron_m2po.trackers import TrackerStartError, code_commit
from megatron_m2po.trackers.mlflow_tracker import mlflow_name
from tests.conftest import REPO
from tests.tracker_records import mlflow_run, wandb_config, wandb_history, wandb_runs

STEPS = {1: {"loss/value": 0.5, "train/lr": 1e-6}, 2: {"loss/value": 0.25, "train/lr": 2e-6}}


def test_a_tag_mlflow_refuses_is_stored_under_a_name_it_takes():
    assert mlflow_name("queue/staleness_frac/256+") == "queue/staleness_frac/256_"
    assert mlflow_name("eval/math500/accuracy") == "eval/math500/accuracy"


def _log_run(run_dir, backends, *, start_step=0, steps=STEPS, **settings):
    config = Config()
    config.logging.backends = list(backends)
    log = MetricsLogger(
        run_dir,
        total_steps=3,
        start_step=start_step,
        backends=backends,
        settings=LoggingConfig(**settings),
        config=dataclasses.asdict(config),
        console="none",
    )
    for step, scalars in steps.items():
        log.histogram(step, "train/staleness", [0, 1, 1, 2])
        log.log(step, scalars)
    log.close()
    return log


def test_the_commit_is_this_checkouts_head():
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout
    assert code_commit().removesuffix("-dirty") == head.strip()


def test_wandb_offline_writes_its_run_dir_with_the_scalars_histogram_config_and_commit(tmp_path):
    _log_run(tmp_path, ["wandb"], wandb_mode="offline", run_name="offline-test")
    history = wandb_history(tmp_path)
    assert sorted(history) == [1, 2]
    for step, scalars in STEPS.items():
        for tag, value in scalars.items():
            assert history[step][tag] == pytest.approx(value), (step, tag)
        assert history[step]["train/staleness/_type"] == "histogram"
        assert sum(history[step]["train/staleness/values"]) == 4  # the four values, binned
    config = wandb_config(tmp_path)
    assert config["git_commit"] == code_commit()
    assert config["train"]["lr"] == Config().train.lr and config["logging"]["backends"] == ["wandb"]
    # --resume from step 2: the same wandb run (its id kept in run_dir) goes on at step 3
    _log_run(tmp_path, ["wandb"], start_step=2, steps={3: {"loss/value": 0.125}}, wandb_mode="offline")
    first, resumed = wandb_runs(tmp_path)
    assert resumed.run_id == first.run_id and first.display_name == "offline-test"
    assert {step: row["loss/value"] for step, row in wandb_history(tmp_path).items()} == {
        1: 0.5,
        2: 0.25,
        3: 0.125,
    }


def test_mlflow_local_store_has_the_scalars_params_config_and_commit_and_a_resume_continues_it(tmp_path):
    _log_run(tmp_path, ["mlflow"], run_name="mlflow-test")
    client, run = mlflow_run(tmp_path)
    assert run.info.run_name == "mlflow-test" and run.info.status == "FINISHED"
    for tag in ("loss/value", "train/lr"):
        history = client.get_metric_history(run.info.run_id, tag)
        assert [(m.step, m.value) for m in history] == [(step, STEPS[step][tag]) for step in STEPS]
    assert run.data.tags["mlflow.source.git.commit"] == code_commit()
    assert run.data.params["train.lr"] == str(Config().train.lr)
    assert run.data.params["logging.backends"] == "['mlflow']"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    # --resume from step 2: the same MLflow run goes on
    _log_run(tmp_path, ["mlflow"], start_step=2, steps={3: {"loss/value": 0.125}})
    client, resumed = mlflow_run(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/value")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25), (3, 0.125)]


def test_a_tracker_that_cannot_start_is_a_named_error(tmp_path, monkeypatch):
    (tmp_path / "tb").write_text("a file where TensorBoard's folder goes")
    with pytest.raises(TrackerStartError, match=r"logging.backends: tensorboard could not start: \w+Error"):
        MetricsLogger(tmp_path, total_steps=1, console="none")
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    settings = LoggingConfig(mlflow_tracking_uri=(blocked / "mlruns").as_uri())
    with pytest.raises(TrackerStartError, match=r"logging.backends: mlflow could not start: "):
        MetricsLogger(tmp_path / "run", total_steps=1, console="none", backends=["mlflow"], settings=settings)
    # wandb online without a login (no API key, no ~/.netrc): refused at start, not at the first log
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    with pytest.raises(TrackerStartError, match=r"logging.backends: wandb could not start: .*API key"):
        MetricsLogger(tmp_path / "online", total_steps=1, console="none", backends=["wandb"])


def test_mlflow_failing_mid_run_is_logged_once_counted_and_tensorboard_goes_on(tmp_path, caplog):
    log = MetricsLogger(tmp_path, total_steps=3, console="none", backends=["tensorboard", "mlflow"])
    log.log(1, {"loss/value": 1.0})
    client, run = mlflow_run(tmp_path)
    metrics = tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id / "metrics"
    shutil.rmtree(metrics)
    metrics.write_text("the store's metrics folder is gone")  # every metric write now fails
    with caplog.at_level(logging.ERROR, logger="megatron_m2po.metrics"):
        log.log(2, {"loss/value": 2.0})
        log.log(3, {"loss/value": 3.0})
        log.close()
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MLflow")]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"MLflow: writing {(tmp_path / 'mlruns').resolve().as_uri()} failed")
    assert log.failures == {"TensorBoard": 0, "MLflow": 3}  # steps 2 and 3, and the close
    assert messages[1].startswith("MLflow: 3 writes")
    assert read_scalars(tmp_path)["loss/value"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert math.isfinite(read_scalars(tmp_path)["loss/value"][-1][1])
