"""Weights & Biases: online, or offline into `run_dir/wandb` (upload later with `wandb sync`)."""

from __future__ import annotations

from collections.abc import Mapping

from megatron_m2po.trackers import RunInfo, Tracker, new_run_id, record_run_id, run_id


class WandbTracker(Tracker):
    title = "wandb"

    def __init__(self, run: RunInfo, settings) -> None:
        import wandb  # the [tracking] extra: loaded only when logging.backends names it

        self.wandb = wandb
        self.errors = (OSError, wandb.Error)
        self.location = f"{settings.wandb_mode} run in {run.run_dir / 'wandb'}"
        ident = run_id(run, "wandb") or new_run_id()
        self.run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity or None,
            name=run.name,
            id=ident,
            resume="allow",  # --resume continues the same wandb run
            dir=str(run.run_dir),
            mode=settings.wandb_mode,
            config={**run.config, "git_commit": run.commit},
            settings=wandb.Settings(console="off", quiet=True),  # the trainer's own console line stays intact
        )
        record_run_id(run, "wandb", ident)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def histogram(self, step: int, tag: str, values) -> None:
        self.run.log({tag: self.wandb.Histogram(values)}, step=step)

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # waits for wandb's writer process: the run directory is complete on return
