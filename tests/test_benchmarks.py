"""The benchmark sets shipped inside the package: installed by a non-editable `pip install`, opened by name,
and described (rows, source, licence) by the README beside them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from megatron_m2po.data.benchmarks import BENCHMARKS, get_benchmark
from tests.conftest import REPO

README = REPO / "megatron_m2po" / "data" / "benchmarks" / "README.md"


def _readme_rows() -> dict[str, int]:
    """name -> rows, from the README's table (`| `math500` | MATH-500 | 500 | ...`)."""
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| (\d+) \|", README.read_text(), re.M)
    }


def test_every_shipped_set_is_in_the_readme_with_its_row_count():
    rows = _readme_rows()
    assert set(rows) == set(BENCHMARKS)
    for name, count in rows.items():
        assert sum(1 for line in get_benchmark(name).path.open() if line.strip()) == count, name


def test_an_unknown_name_lists_the_sets_and_the_closest():
    with pytest.raises(ValueError, match=r"no shipped benchmark 'math50'.*gsm8k.*did you mean 'math500'"):
        get_benchmark("math50")


def test_a_non_editable_install_carries_the_sets(tmp_path):
    """`pip install .` (not -e) puts the JSONL files and README into site-packages: a user who never cloned
    the repository evaluates by name."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "megatron_m2po", src / "megatron_m2po", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "-q"]
    subprocess.run([*pip, "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)  # nothing may be read from the source tree
    probe = (
        "import json, megatron_m2po.data.benchmarks as b\n"
        "print(json.dumps({n: [str(x.path), sum(1 for _ in x.path.open())] for n, x in b.BENCHMARKS.items()}))\n"
        "print((b.BENCHMARKS['math500'].path.parent / 'README.md').is_file())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
        timeout=120,
    ).stdout.splitlines()
    installed = json.loads(out[0])
    assert out[1] == "True"
    for name, (path, rows) in installed.items():
        assert path.startswith(str(target)), path
        assert rows == _readme_rows()[name]
