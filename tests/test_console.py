"""megatron_m2po/console.py: the listed third-party messages are hidden, `--verbose` brings them back, and a
spawned reward worker follows its parent; stage bars log their progress when stderr is not a terminal.

The demo's own console (every filter, end to end) is checked in tests/test_demo.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from megatron_m2po import console
from tests.conftest import subprocess_env

# `m2po train` on a missing recipe: the import of the trainer (Megatron) then a config error; then the
# math reward in this process and in a reward-pool worker process (math-verify's timeout warning).
SCRIPT = textwrap.dedent(
    """
    import sys
    from megatron_m2po.commands import m2po
    from megatron_m2po.rollout.rewards import RewardPool, math_reward

    verbose = sys.argv[1:] == ["--verbose"]
    assert m2po.main(["train", "--config", "/nonexistent/recipe.yaml", *sys.argv[1:]]) == 2
    assert math_reward("\\\\boxed{\\\\frac{1}{2}}", "0.5") == 1.0  # not plain integers: math-verify parses
    with RewardPool(workers=1) as pool:
        assert pool.score(["\\\\boxed{0.25}"], ["\\\\frac14"]) == [1.0]
    """
)


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", M2PO_QUIET=""),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_warnings_hidden_unless_verbose(verbose):
    out = _run(*(["--verbose"] if verbose else []))
    assert "config error" in out  # the project's own message always shows
    fallback = "Transformer Engine and Apex are not installed"
    assert (fallback in out) == verbose, out[-3000:]
    # twice with --verbose: once in this process, once in the reward worker (it inherits the parent's choice)
    assert out.count("Timeout is disabled as timeout_seconds") == (2 if verbose else 0), out[-3000:]


def test_every_filter_says_why():
    for entry in (*console.FILTERED_WARNINGS, *console.FILTERED_LOGGERS):
        assert len(entry[-1]) > 30, entry


def test_stage_bar_logs_progress_and_eta_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_m2po.progress"):
        with console.StageBar("warm start", 100, log_every=50) as bar:
            for step in range(1, 61):
                bar.update(step, loss=1.0 / step)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("warm start 50/100  loss 0.02  eta 0m0")
