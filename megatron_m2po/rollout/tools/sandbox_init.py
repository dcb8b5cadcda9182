"""The sandbox's launcher: runs as `python -I -S sandbox_init.py SPEC_JSON`, code on stdin, status to fd 3.

Standard library only and executed by path, so nothing of the caller's environment or package is imported
into the process that sets up the isolation. Process tree (isolated):

    launcher (the caller's uid)  writes the new user namespace's uid/gid maps when it is root
      -> setup    unshare(user, mount, net, pid, ipc, uts); dies with the launcher (PDEATHSIG)
        -> init   pid 1 of the new pid namespace: private /proc, /tmp and /dev/shm, everything else read-only;
                  reaps, reports the code's exit status and rusage; when it exits the kernel kills the rest
          -> code the unprivileged uid 1000 of the namespace (mapped to an unprivileged uid outside), no
                  capabilities, no_new_privs, rlimits, cwd /tmp, environment as given, stdin /dev/null

Unisolated (`spec["isolate"]` false): launcher -> code, with the rlimits only, in the caller's work dir.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = {
    "user": CLONE_NEWUSER,
    "mount": CLONE_NEWNS,
    "network": CLONE_NEWNET,
    "pid": CLONE_NEWPID,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 0x4000, 1 << 18
MS_RELATIME, MS_STRICTATIME, MS_MOVE, MNT_DETACH = 1 << 21, 1 << 24, 8192, 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Mount options that a less privileged mount namespace must keep when it remounts (the kernel locks them).
KEPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
INNER_ID = 1000  # the code's uid and gid inside the namespace

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _call(what, ret):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _call(
        f"mount {fstype or ''} {target}", libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data))
    )


def _die_with_parent(parent=None):
    """SIGKILL this process when its parent dies. Set after the last change of credentials (unshare of a user
    namespace, setfsuid), which clear it; `parent`: exit now if it already died."""
    _call("prctl(PR_SET_PDEATHSIG)", libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _unshare(names):
    flags = 0
    for name in names:
        flags |= NAMESPACES[name]
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot create {', '.join(_missing(names))} namespace(s): {os.strerror(err)}")


def _missing(names):
    """The namespaces that fail on their own (each tried in a throwaway child, beside a user namespace)."""
    missing = []
    for name in sorted(names, key=lambda n: n != "user"):  # without a user namespace, none of the others
        if missing == ["user"]:
            break
        pid = os.fork()
        if pid == 0:
            extra = 0 if name == "user" else CLONE_NEWUSER
            os._exit(0 if libc.unshare(NAMESPACES[name] | extra) == 0 else 1)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            missing.append(name)
    return missing or ["the combination of the"]


def _mountinfo():
    """(mount point, per-mount options) of every mount this namespace sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for a space
            out.append((point, fields[5].split(",")))
    return out


def _make_readonly():
    """Remount every mount read-only; returns those the kernel refused (reported, never silent)."""
    refused = []
    for point, options in _mountinfo():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name in options:
            flags |= KEPT_FLAGS.get(name, 0)
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            refused.append(f"{point}: {e.strerror}")
    return refused


def _hidden_ancestor(path, uid):
    """The first directory on `path` that `uid` may not enter (a home directory kept 0700), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        st = os.stat(d)
        if not st.st_mode & 0o001 and st.st_uid != uid:
            return d
    return None


def _expose(wanted):
    """Hide each directory the code's uid may not enter under an empty tmpfs, then bind the Python
    installation back at its own path inside it, so the code runs the caller's interpreter and packages
    without seeing the rest of a private home directory. `wanted`: (path, its hidden ancestor), found before
    the user namespace (where the owner of an unmapped directory reads as the overflow uid)."""
    if not wanted:
        return
    # Reach each path while it is visible (and while this process's own, unmapped, uid may enter it).
    held = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path) for path, _ in wanted]
    for hidden in sorted({h for _, h in wanted}):
        _mount(
            "tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, f"size=1m,mode=755,uid={INNER_ID},gid={INNER_ID}"
        )
    libc.setfsgid(INNER_ID)
    libc.setfsuid(INNER_ID)  # the tmpfs takes new directories from a uid mapped in the namespace only
    for fd, path in held:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def _write(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, f"writing {text.strip()!r} to {path}: {e.strerror}") from None


def _map_ids(pid, outside_uid, outside_gid, privileged):
    """Map the code's uid/gid 1000 to an unprivileged id outside. Root may map any id; anyone else only
    their own, after giving up setgroups."""
    if not privileged:
        _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", f"{INNER_ID} {outside_uid} 1\n")
    _write(f"/proc/{pid}/gid_map", f"{INNER_ID} {outside_gid} 1\n")


def _set_limits(spec):
    cpu = int(spec["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_AS, spec["memory_bytes"], spec["memory_bytes"]),
        (resource.RLIMIT_NPROC, spec["max_processes"], spec["max_processes"]),
        (resource.RLIMIT_FSIZE, spec["max_file_bytes"], spec["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, 256, 256),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def _exec_code(spec, code, status_fd):
    """In the forked code process: stdin from /dev/null, drop the status pipe, become the unprivileged uid,
    write the code (as that uid: the namespace's tmpfs takes no file from an unmapped uid), limits, exec."""
    try:
        os.close(status_fd)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if spec["isolate"]:
            if spec["drop_groups"]:
                os.setgroups([])
            os.setresgid(INNER_ID, INNER_ID, INNER_ID)
            os.setresuid(INNER_ID, INNER_ID, INNER_ID)
        _call("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        os.chdir(spec["workdir"])
        code_path = os.path.join(spec["workdir"], "main.py")
        with open(code_path, "wb") as f:
            f.write(code)
        _set_limits(spec)
        os.execve(spec["python"], [spec["python"], "-I", "-u", code_path], spec["env"])
    except BaseException as e:  # anything here is the sandbox's failure, not the code's
        os.write(2, f"sandbox: cannot start the code: {e}\n".encode())
    os._exit(127)


def _run_code(spec, code, status_fd, report):
    """Write the code, run it in a child, reap every process (pid 1 inherits orphans), report its status."""
    report["setup_seconds"] = time.monotonic() - spec["t0"]
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_code(spec, code, status_fd)
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if done == pid:
            report["run_seconds"] = time.monotonic() - start
            report["cpu_seconds"] = usage.ru_utime + usage.ru_stime
            report["max_rss_kb"] = usage.ru_maxrss
            if os.WIFSIGNALED(status):
                report["signal"] = os.WTERMSIG(status)
            else:
                report["exit_code"] = os.WEXITSTATUS(status)
            if spec["isolate"]:
                break  # pid 1 leaving kills whatever the code left behind
    os.write(status_fd, json.dumps(report).encode() + b"\n")


def _init(spec, code, status_fd, report):
    """pid 1 of the new namespaces: the private filesystem view, then the code."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _expose(spec["expose"])
    # Unix sockets ignore a read-only mount: hide the directories where services keep theirs (a socket left
    # world-writable there would still be reachable; /tmp and /dev/shm are replaced below).
    for path in ("/run", "/var/run"):
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    refused = _make_readonly()
    if refused:
        raise OSError(f"could not make these mounts read-only: {'; '.join(refused[:5])}")
    size = f"size={spec['disk_bytes']},mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, size)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        report["isolation"]["proc"] = True
    except OSError as e:
        report["isolation"]["proc"] = False
        report["warnings"].append(f"the namespace's own /proc could not be mounted ({e.strerror})")
    spec["workdir"] = "/tmp"
    _die_with_parent()
    _run_code(spec, code, status_fd, report)


def _isolated(spec, code, status_fd, report):
    uid, gid = os.geteuid(), os.getegid()  # as the parent namespace sees them: afterwards they read 65534
    privileged = uid == 0
    to_setup, from_setup = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # setup
        try:
            os.close(to_setup[1])
            os.close(from_setup[0])
            launcher = os.getppid()
            _unshare(list(NAMESPACES))
            _die_with_parent(launcher)
            if not privileged:
                _map_ids("self", uid, gid, False)
            os.write(from_setup[1], b"u")
            if os.read(to_setup[0], 1) != b"m":
                os._exit(1)
            init = os.fork()
            if init == 0:
                try:
                    _init(spec, code, status_fd, report)
                except BaseException as e:
                    report["error"] = f"sandbox setup: {e}"
                    os.write(status_fd, json.dumps(report).encode() + b"\n")
                os._exit(0)
            os.waitpid(init, 0)
        except BaseException as e:
            report["error"] = f"sandbox setup: {e}"
            os.write(status_fd, json.dumps(report).encode() + b"\n")
        os._exit(0)
    os.close(to_setup[0])
    os.close(from_setup[1])
    if os.read(from_setup[0], 1) == b"u":
        if privileged:
            _map_ids(pid, spec["outside_uid"], spec["outside_gid"], True)
        os.write(to_setup[1], b"m")
    os.waitpid(pid, 0)


def main():
    spec = json.loads(sys.argv[1])
    spec["t0"] = time.monotonic()
    status_fd = spec["status_fd"]
    code = sys.stdin.buffer.read()
    report = {"isolation": {}, "warnings": [], "exit_code": None, "signal": None}
    spec["drop_groups"] = os.geteuid() == 0
    code_uid = spec["outside_uid"] if os.geteuid() == 0 else os.geteuid()
    hidden = [(p, _hidden_ancestor(p, code_uid)) for p in spec["expose"]]
    spec["expose"] = [(p, h) for p, h in hidden if h is not None]
    try:
        if spec["isolate"]:
            report["isolation"] = {name: True for name in NAMESPACES}
            _isolated(spec, code, status_fd, report)
        else:
            _run_code(spec, code, status_fd, report)
    except BaseException as e:
        report["error"] = f"sandbox launcher: {e}"
        os.write(status_fd, json.dumps(report).encode() + b"\n")


if __name__ == "__main__":
    main()
