"""Read back what the wandb and MLflow trackers wrote, offline, to check it against what was logged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers
FULL, LAST = 1, 4


def wandb_records(run_dir: Path) -> list:
    """The protobuf records (wandb's own `Record` type) of the offline runs in `run_dir/wandb`, oldest first
    (a resumed run writes a second run file with the same id)."""
    paths = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert paths, f"no offline wandb run in {run_dir / 'wandb'}"
    return [record for path in paths for record in _run_file_records(path)]


def _run_file_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """step -> {key: value} of the history rows (histograms as their JSON objects' fields)."""
    rows = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows[row["_step"]] = row
    return rows


def wandb_runs(run_dir: Path) -> list:
    """The `run` records (id, name, config), one per start."""
    return [r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]


def wandb_config(run_dir: Path) -> dict:
    """The config the run started with."""
    return {item.key: json.loads(item.value_json) for item in wandb_runs(run_dir)[0].config.update}


def mlflow_run(run_dir: Path, run_id: str | None = None):
    """(client, run) of the MLflow file store in run_dir/mlruns: the run recorded in trackers.json."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = run_id or json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, client.get_run(run_id)
