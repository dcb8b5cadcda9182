"""MLflow: a tracking server, or by default a local file store in `run_dir/mlruns`
(`mlflow ui --backend-store-uri run_dir/mlruns`). MLflow has no histograms; scalars (a character MLflow
refuses in a name becomes "_"), params, the config as an artifact and the git commit as the run's source tag."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping

from megatron_m2po.trackers import RunInfo, Tracker, flat_config, record_run_id, run_id

PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
# MLflow metric names may hold only these characters; any other becomes "_" (queue/staleness_frac/256+).
_NOT_IN_A_NAME = re.compile(r"[^\w\-. :/]")


def mlflow_name(tag: str) -> str:
    """The tag as MLflow stores it."""
    return _NOT_IN_A_NAME.sub("_", tag)


class MlflowTracker(Tracker):
    title = "MLflow"

    def __init__(self, run: RunInfo, settings) -> None:
        uri = settings.mlflow_tracking_uri or (run.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store (the local mode that needs no database) behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param  # the [tracking] extra: loaded only when named
        from mlflow.exceptions import MlflowException  # the [tracking] extra, as above
        from mlflow.tracking import MlflowClient  # the [tracking] extra, as above

        self.Metric, self.errors, self.location = Metric, (OSError, MlflowException), uri
        self.client = MlflowClient(tracking_uri=uri)
        ident = run_id(run, "mlflow")
        if ident is None:
            experiment = self.client.get_experiment_by_name(settings.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(settings.mlflow_experiment)
            )
            tags = {"mlflow.source.git.commit": run.commit, "git_commit": run.commit}
            ident = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
            self.client.log_dict(ident, run.config, "config.yaml")
            params = [Param(k, v) for k, v in flat_config(run.config).items()]
            for i in range(0, len(params), PARAMS_PER_BATCH):
                self.client.log_batch(ident, params=params[i : i + PARAMS_PER_BATCH])
            record_run_id(run, "mlflow", ident)
        else:  # a resumed run continues its MLflow run; its params stay those it started with
            self.client.update_run(ident, status="RUNNING")
            self.client.set_tag(ident, "git_commit", run.commit)
        self.run_id = ident

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[self.Metric(mlflow_name(k), v, now, step) for k, v in values.items()]
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
