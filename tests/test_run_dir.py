"""The run directory: a fresh run never writes among files it did not write, nor into a system directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_m2po.config import Config, ConfigError
from megatron_m2po.queue.journal import RETIRED_IDS_FILE, remove_journal
from megatron_m2po.trainer.run_dir import MARKER, check_run_dir, mark_run_dir


def _cfg(run_dir, **logging) -> Config:
    cfg = Config()
    cfg.logging.run_dir = str(run_dir)
    for key, value in logging.items():
        setattr(cfg.logging, key, value)
    return cfg


@pytest.mark.parametrize(
    "run_dir, why",
    [
        ("/", "a system directory"),
        ("/etc", "a system directory"),
        ("/usr/local/runs", "inside /usr"),
        ("/proc/self", "inside /proc"),
        ("/tmp", "a system directory"),
        (str(Path.home()), "your home directory itself"),
        (str(Path.home().parent), "a system directory or your home directory"),
    ],
)
def test_system_directories_are_never_run_directories(run_dir, why):
    for resume in (False, True):
        with pytest.raises(ConfigError, match=rf"'logging.run_dir': {run_dir} is .*{why}"):
            check_run_dir(_cfg(run_dir, reuse_run_dir=True), resume=resume)


def test_a_fresh_run_refuses_files_it_did_not_write_unless_told_to_reuse(tmp_path):
    check_run_dir(_cfg(tmp_path / "new"), resume=False)  # a new directory
    mine = tmp_path / "mine"
    mine.mkdir()
    check_run_dir(_cfg(mine), resume=False)  # an empty one
    (mine / "config.yaml").write_text("my own config\n")
    with pytest.raises(
        ConfigError, match=rf"{mine} was not made by a run \(no {MARKER}\) and holds .*\(config.yaml\)"
    ):
        check_run_dir(_cfg(mine), resume=False)
    with pytest.raises(
        ConfigError, match="no m2po_run.json"
    ):  # --resume with nothing to resume is a fresh run
        check_run_dir(_cfg(mine), resume=True)
    check_run_dir(_cfg(mine, reuse_run_dir=True), resume=False)

    run = tmp_path / "run"
    mark_run_dir(run)
    for name in ("config.yaml", "consumed.jsonl"):
        (run / name).write_text("")
    for name in ("tb", "queue", "weights"):
        (run / name).mkdir()
    (run / "queue" / "segment-00000000.m2poj").write_bytes(b"")
    (run / "queue" / RETIRED_IDS_FILE).write_text("")
    check_run_dir(_cfg(run), resume=False)  # only what a run writes: an earlier attempt of this run
    (run / "queue" / "precious.txt").write_text("not the journal's")
    for name in ("notes.md", "a", "b", "c", "d", "e"):
        (run / name).write_text("")
    with pytest.raises(ConfigError, match=r"holds files a run does not write \(a, b, c, d, e and 2 more\)"):
        check_run_dir(_cfg(run), resume=False)
    for name in ("a", "b", "c", "d", "e"):
        (run / name).unlink()
    with pytest.raises(ConfigError, match=r"\(notes.md, queue/precious.txt\).*logging.reuse_run_dir=true"):
        check_run_dir(_cfg(run), resume=False)
    check_run_dir(_cfg(run), resume=True)  # continuing the run that lives there
    check_run_dir(_cfg(run, reuse_run_dir=True), resume=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_run_dir(_cfg(tmp_path / "file"), resume=False)


def test_clearing_the_queue_journal_leaves_what_is_not_the_journals(tmp_path):
    queue = tmp_path / "queue"
    queue.mkdir()
    for name in ("segment-00000000.m2poj", "segment-00000001.m2poj", RETIRED_IDS_FILE):
        (queue / name).write_bytes(b"x")
    assert remove_journal(queue) == [] and not queue.exists()
    queue.mkdir()
    (queue / "segment-00000003.m2poj").write_bytes(b"x")
    (queue / "precious.txt").write_text("keep me")
    assert remove_journal(queue) == [queue / "precious.txt"]
    assert sorted(p.name for p in queue.iterdir()) == ["precious.txt"]


def test_the_trainer_refuses_before_writing_anything(tmp_path, capsys):
    """`m2po train` into `/` or a directory of other files: a config error, nothing written."""
    from argparse import Namespace

    from megatron_m2po.commands.train import run
    from megatron_m2po.models.tiny import make_tiny_model

    def main(argv: list[str]) -> int:
        return run(Namespace(config=argv[1], resume=False, overrides=argv[2:], verbose=False))

    model = make_tiny_model("qwen3", tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"problem": "1+1", "answer": "2"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {model}}}\ndata: {{path: {prompts}}}\nlogging: {{console: none}}\n")
    before = sorted(p.name for p in Path("/").iterdir())
    assert main(["--config", str(recipe), "logging.run_dir=/"]) == 2
    assert "config error: 'logging.run_dir': / is a system directory" in capsys.readouterr().err
    assert sorted(p.name for p in Path("/").iterdir()) == before

    project = tmp_path / "project"
    (project / "queue").mkdir(parents=True)
    (project / "queue" / "notes.txt").write_text("the user's")
    (project / "config.yaml").write_text("the user's own config\n")
    assert main(["--config", str(recipe), f"logging.run_dir={project}"]) == 2
    assert "(config.yaml, queue)" in capsys.readouterr().err
    assert (project / "queue" / "notes.txt").read_text() == "the user's"
    assert (project / "config.yaml").read_text() == "the user's own config\n"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "queue"]


def test_empty_run_subdirectories_made_ahead_are_accepted(tmp_path):
    run = tmp_path / "run"
    (tmp_path / "big_disk").mkdir()
    run.mkdir()
    (run / "checkpoints").symlink_to(tmp_path / "big_disk")  # checkpoints on another disk
    (run / "tb").mkdir()
    check_run_dir(_cfg(run), resume=False)
    (tmp_path / "big_disk" / "old").mkdir()
    with pytest.raises(
        ConfigError, match=r"no m2po_run.json\) and holds files a run does not write \(checkpoints\)"
    ):
        check_run_dir(_cfg(run), resume=False)
