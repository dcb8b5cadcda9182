"""platform.py is the one module that decides CPU vs GPU: nowhere else in the package touches `torch.cuda`,
names the "cuda" device or calls `.cuda()`. A device decision elsewhere is how a CPU-only path breaks on a
GPU node (or the reverse) without any CPU test noticing, so new code asks `platform` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_m2po"
PLATFORM = PACKAGE / "platform.py"

# path relative to the package -> why it must decide the device itself. Empty: nothing needs to.
ALLOWED: dict[str, str] = {}


def device_decisions(source: str) -> list[tuple[int, str]]:
    """(line, what) for each `torch.cuda...`, `"cuda"` / `"cuda:N"` literal and `.cuda(...)` call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "cuda"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append((node.lineno, "torch.cuda"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "cuda" or node.value.startswith("cuda:"):
                found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            found.append((node.lineno, ".cuda()"))
    return sorted(set(found))


def test_the_scan_finds_each_kind_of_device_decision():
    planted = (
        'import torch\nx = torch.cuda.is_available()\nd = torch.device("cuda:0")\nm.cuda()\ny = "cuda"\n'
    )
    assert device_decisions(planted) == [(2, "torch.cuda"), (3, "'cuda:0'"), (4, ".cuda()"), (5, "'cuda'")]
    # Megatron's own names and prose about CUDA are not device decisions
    assert (
        device_decisions(
            'from megatron.core import tensor_parallel\ntensor_parallel.get_cuda_rng_tracker()\n"""CUDA"""\n'
        )
        == []
    )


def test_only_platform_decides_cpu_vs_gpu():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if path == PLATFORM or rel in ALLOWED:
            continue
        offenders += [
            f"megatron_m2po/{rel}:{line}: {what}" for line, what in device_decisions(path.read_text())
        ]
    assert not offenders, "ask megatron_m2po/platform.py instead:\n" + "\n".join(offenders)


def test_platform_itself_is_scanned():
    """The boundary is real: platform.py does touch the GPU, so the scan would see it anywhere else."""
    assert device_decisions(PLATFORM.read_text())
