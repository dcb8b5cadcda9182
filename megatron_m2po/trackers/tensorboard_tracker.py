"""TensorBoard event files in `run_dir/tb` (`tensorboard --logdir runs/`; read back by `metrics.read_scalars`)."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from megatron_m2po.trackers import RunInfo, Tracker


class TensorBoardTracker(Tracker):
    title = "TensorBoard"

    def __init__(self, run: RunInfo, settings) -> None:
        from torch.utils.tensorboard import SummaryWriter  # loads tensorboard (~1 s): only when named

        self.location = str(run.run_dir / "tb")
        # purge_step drops events of the steps a resumed run redoes, so the curves stay single-valued.
        self.writer = SummaryWriter(self.location, purge_step=run.start_step + 1 if run.start_step else None)
        self.writer.add_text(
            "config", "```yaml\n" + yaml.safe_dump(run.config, sort_keys=False) + "```", run.start_step
        )
        self.writer.add_text("git_commit", run.commit, run.start_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, values) -> None:
        self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
