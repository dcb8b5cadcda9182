"""Fetch the METADATA of each node role's extra (setup.py: `trainer`, `sglang`) for the clusters' CPython.

    python tools/role_extras.py DEST

Trainer nodes and rollout nodes run different environments (docs/rollout.md, "Two environments"): a full
resolve of either needs its image, but the pinned packages must exist as wheels for CPython 3.12 on
manylinux x86_64, and tests/test_environments.py checks their METADATA against the project's own
requirements. `pip download --no-deps` per package keeps this to a few MB; only `<name>.METADATA` stays.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROLES = ("trainer", "sglang")
PYTHON = "3.12"
SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"
PLATFORMS = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def setup_lists(setup_py: Path = SETUP_PY) -> dict[str, list[str]]:
    """setup.py's CORE and EXTRAS literals, read without running setup()."""
    out = {}
    for node in ast.parse(setup_py.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "CORE":
                out["core"] = ast.literal_eval(node.value)
            elif node.targets[0].id == "EXTRAS":
                out.update(ast.literal_eval(node.value))
    return out


def download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    lists = setup_lists()
    kept = []
    with tempfile.TemporaryDirectory() as tmp:
        for role in ROLES:
            reqs = [re.sub(r"\[[^\]]*\]", "", r) for r in lists[role]]  # each wheel, not its extras
            if role == "trainer":  # the core requirement built for the trainer's CPython too
                reqs += [r for r in lists["core"] if r.startswith("megatron-core")]
            platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
            cmd += ["--python-version", PYTHON, *platforms, "-d", tmp, *reqs]
            subprocess.run(cmd, check=True)
        for whl in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                (name,) = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
                target = dest / (name.split("-")[0].lower().replace("_", "-") + ".METADATA")
                target.write_bytes(z.read(name))
                kept.append(target)
    return kept


if __name__ == "__main__":
    for path in download(Path(sys.argv[1])):
        print(path)
