"""Two environments: trainer nodes (NGC image + [trainer]) and rollout nodes (SGLang's stack + [sglang]).

The pinned sglang fixes torch and transformers exactly, so no single extra can hold it and Transformer Engine
in the NGC image. These tests check that each role has its own extra and image, that no instruction still
names the old combined `[gpu]` extra, and (from the wheels' METADATA that .ci/run fetches with
tools/role_extras.py) that the pins exist for the clusters' CPython and fit the project's own requirements.
"""

from __future__ import annotations

import email
import os
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from megatron_m2po.rollout.engines.sglang import SGLANG_ROUTER_VERSION, SGLANG_VERSION

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.role_extras import PYTHON, setup_lists  # noqa: E402

META = Path(os.environ.get("M2PO_EXTRAS_META", "~/.cache/m2po_ci/extras-meta")).expanduser()


def _metadata(name: str) -> email.message.Message:
    path = META / f"{name}.METADATA"
    if not path.exists():
        reason = f"{path} missing: .ci/run fetches it with `python tools/role_extras.py {META}`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return email.message_from_string(path.read_text())


def _pins(meta: email.message.Message) -> dict[str, str]:
    """name -> version of every unconditional `==` requirement."""
    out = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None and len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==":
            out[req.name.lower()] = next(iter(req.specifier)).version
    return out


def test_each_role_has_its_own_extra():
    lists = setup_lists()
    assert "gpu" not in lists, "one extra with sglang and transformer-engine cannot resolve: their pinned torch versions differ"
    assert any(r.startswith("transformer-engine") for r in lists["trainer"])
    assert not any("sglang" in r for r in lists["trainer"])
    assert sorted(lists["sglang"]) == sorted(
        [f"sglang=={SGLANG_VERSION}", f"sglang-router=={SGLANG_ROUTER_VERSION}"]
    )


def test_each_image_installs_one_role():
    trainer, rollout = (REPO / "Dockerfile").read_text(), (REPO / "Dockerfile.rollout").read_text()
    trainer_pip = " ".join(line for line in trainer.splitlines() if "pip install" in line)
    rollout_pip = " ".join(line for line in rollout.splitlines() if "pip install" in line)
    assert '".[trainer]"' in trainer_pip and "sglang" not in trainer_pip
    assert (
        '".[sglang]"' in rollout_pip
        and "trainer" not in rollout_pip
        and "nvcr.io/nvidia/pytorch" not in rollout
    )


def test_no_instruction_names_the_combined_gpu_extra():
    files = [REPO / "README.md", REPO / "Dockerfile", REPO / "Dockerfile.rollout", REPO / ".ci" / "run"]
    files += [
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples").rglob("*.md"),
        *(REPO / "examples").rglob("*.sh"),
    ]
    hits = [f"{p.relative_to(REPO)}" for p in files if re.search(r"\.\[gpu\]|\[gpu\] extra", p.read_text())]
    assert hits == []


def test_rollout_pins_exist_and_fit_the_project_requirements():
    """sglang's exact pins (torch, transformers, ...) must satisfy CORE, or `.[sglang]` cannot resolve."""
    sglang = _metadata("sglang")
    assert (
        sglang["Version"] == SGLANG_VERSION and _metadata("sglang-router")["Version"] == SGLANG_ROUTER_VERSION
    )
    pins = _pins(sglang)
    assert {"torch", "transformers"} <= set(pins)  # why the roles cannot share the NGC image
    checked = 0
    for line in setup_lists()["core"]:
        req = Requirement(line)
        if req.name.lower() in pins:
            assert pins[req.name.lower()] in req.specifier, (
                f"sglang pins {req.name}=={pins[req.name.lower()]}"
            )
            checked += 1
    assert checked >= 3  # torch, transformers, tokenizers at least


def test_trainer_packages_exist_for_the_cluster_python():
    for name in ("transformer-engine", "megatron-core", "sglang"):
        requires = _metadata(name).get("Requires-Python")
        assert requires is None or PYTHON in SpecifierSet(requires), f"{name} requires Python {requires}"
