"""Write failures that name the file and the errno, and the errnos that retrying will not cure.

A full disk (ENOSPC), a quota (EDQUOT), a file-size limit (EFBIG), an I/O error (EIO) or a read-only
filesystem (EROFS) stays until someone acts: the writers re-raise it as a `WriteError` whose message says
what was being written, where, and which errno, and the rollout producer stops after a bounded number of
them in a row instead of retrying forever (docs/training.md, "Disk full").
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

PERSISTENT_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


class WriteError(OSError):
    """Writing a file failed; `str()` reads `[Errno 28] journal append failed: ENOSPC (No space left on
    device): '/run/queue/segment-00000000.m2poj'`."""

    @property
    def persistent(self) -> bool:
        return self.errno in PERSISTENT_WRITE_ERRNOS


def write_error(what: str, path: str | os.PathLike, cause: OSError) -> WriteError:
    """`cause` (raised while writing `path`) as a `WriteError` naming `what`, the path and the errno."""
    if isinstance(cause, WriteError):
        return cause
    symbol = errno.errorcode.get(cause.errno, "no errno") if cause.errno is not None else "no errno"
    return WriteError(cause.errno, f"{what} failed: {symbol} ({cause.strerror or cause})", os.fspath(path))


@contextlib.contextmanager
def naming_write_errors(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an `OSError` from the block as `write_error(what, path, ...)`."""
    try:
        yield
    except OSError as e:
        raise write_error(what, path, e) from e
