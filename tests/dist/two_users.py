"""Acting as a second user in the trust tests: root runs a command as `nobody`, the way another user of a
shared machine would write files a checkpoint ends up reading."""

from __future__ import annotations

import os
import subprocess

NOBODY = 65534


def as_nobody(script: str) -> None:
    """Run shell `script` as user `nobody` (needs root). A shell, not Python: nobody may not reach the
    interpreter (a pyenv under /root)."""

    def drop() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    subprocess.run(
        ["sh", "-c", script], check=True, preexec_fn=drop, capture_output=True, timeout=60, cwd="/"
    )
