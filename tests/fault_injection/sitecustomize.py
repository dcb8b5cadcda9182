"""Faults for end-to-end tests, injected into a child interpreter whose PYTHONPATH starts with this folder.

Nothing happens until the file named by $M2PO_FAULT_TRIGGER exists (the test creates it mid-run); then:

- $M2PO_FAULT_DISK_FULL=PATH: every write to PATH, or to a file under it, fails with ENOSPC, raised by the
  kernel itself: the descriptors open on such files are replaced by /dev/full (dup2), and files opened for
  writing later are opened on /dev/full. Reads are untouched.
- $M2PO_FAULT_PRODUCER_CRASH=1: the rollout producer's next prompt raises, so its thread dies.
"""

from __future__ import annotations

import builtins
import io
import os
import threading
import time

TRIGGER = os.environ.get("M2PO_FAULT_TRIGGER")
DISK_FULL = os.path.realpath(os.environ["M2PO_FAULT_DISK_FULL"]) if os.environ.get("M2PO_FAULT_DISK_FULL") else None
PRODUCER_CRASH = os.environ.get("M2PO_FAULT_PRODUCER_CRASH") == "1"


def _under(path) -> bool:
    try:
        p = os.path.realpath(os.fsdecode(path))
    except TypeError:  # a file descriptor
        return False
    return p == DISK_FULL or p.startswith(DISK_FULL.rstrip("/") + "/")


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY


def _replace_open_descriptors() -> None:
    """dup2 /dev/full over every descriptor of this process that is open for writing on a file under PATH."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    flags = int(next(ln for ln in info if ln.startswith("flags:")).split()[1], 8)
            except (OSError, StopIteration):
                continue
            if fd != full and _writes(flags) and _under(target):
                os.dup2(full, fd)
    finally:
        os.close(full)


def _install_disk_full() -> None:
    real_os_open, real_io_open = os.open, io.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if _writes(flags) and _under(path):
            return real_os_open("/dev/full", os.O_WRONLY)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _under(file):
            return real_io_open("/dev/full", mode.replace("x", "w"), *args, **kwargs)
        return real_io_open(file, mode, *args, **kwargs)

    os.open, io.open, builtins.open = os_open, io_open, io_open
    while True:  # descriptors opened before (journal segment, event file) and any opened since
        _replace_open_descriptors()
        time.sleep(0.05)


def _crash_producer() -> None:
    from megatron_m2po.rollout.manager import RolloutManager

    def next_prompt(self):
        raise RuntimeError("injected fault: the prompt source failed")

    RolloutManager._next_prompt = next_prompt


def _watch() -> None:
    while not os.path.exists(TRIGGER):
        time.sleep(0.05)
    if PRODUCER_CRASH:
        _crash_producer()
    if DISK_FULL:
        _install_disk_full()


if TRIGGER and (DISK_FULL or PRODUCER_CRASH):
    threading.Thread(target=_watch, name="fault-injection", daemon=True).start()
