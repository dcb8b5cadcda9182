"""The sandboxed Python tool against hostile code: each attack ends within its limit, reaches nothing outside
its call, and leaves this test process, its other processes and the pool working.

These run the real sandbox (Linux namespaces, rlimits) on this machine; none is mocked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from megatron_m2po.config import ConfigError, SandboxConfig, load_config, validate
from megatron_m2po.rollout.tools import SandboxPool, ToolResult
from megatron_m2po.rollout.tools.sandbox import _BoundedReader
from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.timeout(120)

LIMITS = SandboxConfig(
    workers=4, cpu_seconds=2, wall_seconds=6.0, memory_mb=512, max_processes=16, max_output_bytes=65536
)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(LIMITS) as p:
        yield p


def _code(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def _still_works(pool: SandboxPool) -> None:
    result = pool.run("print(6 * 7)")
    assert result.ok and result.stdout == "42\n", result


_EARLIER: set[int] = set()


@pytest.fixture(autouse=True)
def _children_of_earlier_tests():
    """Children that earlier tests of the same session left running (reward-pool workers, engine servers) are
    not a call's: only processes started during this test count as leftovers."""
    _EARLIER.clear()
    _EARLIER.update(p.pid for p in psutil.Process().children(recursive=True))


def _leftovers() -> list[psutil.Process]:
    """Descendants of this test still running (a call's processes are all descendants of its launcher)."""
    mine = psutil.Process().children(recursive=True)
    return [p for p in mine if p.pid not in _EARLIER and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []


def _wait_for_launcher() -> psutil.Process:
    """The launcher of a call this test started (once it is running)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        launchers = [p for p in _leftovers() if "sandbox_init.py" in " ".join(_cmdline(p))]
        if launchers:
            return launchers[0]
        time.sleep(0.05)
    raise AssertionError("no sandbox launcher appeared")


def test_the_machine_isolates_and_says_what_it_got(pool):
    caps = pool.capabilities
    assert caps.isolated, caps.problems
    assert all(caps.namespaces[n] for n in ("user", "mount", "network", "pid")), caps
    assert "isolated: namespaces user, mount, network, pid" in caps.describe()
    identity = pool.run(
        "import os\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "print([status[k].split() for k in ('Uid', 'Gid', 'Groups', 'CapPrm', 'CapEff', 'NoNewPrivs')])\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    )
    assert identity.stdout.splitlines() == [
        str([["1000"] * 4, ["1000"] * 4, [], ["0000000000000000"], ["0000000000000000"], ["1"]]),
        "['1', '2']",  # the call's own pid 1 and the code: no process of the host is visible
    ], identity


def test_ordinary_code_runs_with_the_installed_packages(pool):
    result = pool.run("import sympy\nprint(sympy.factorint(360))\nprint(sum(i * i for i in range(10)))")
    assert result.ok, result
    assert result.stdout == "{2: 3, 3: 2, 5: 1}\n285\n"
    assert result.setup_seconds > 0 and result.cpu_seconds > 0 and result.wall_seconds >= result.setup_seconds
    failed = pool.run("raise ValueError('bad')")
    assert failed.exit_code == 1 and "ValueError: bad" in failed.stderr and failed.limit is None


def test_infinite_loop_is_killed_at_the_wall_limit(pool):
    t0 = time.monotonic()
    result = pool.run("import time\nwhile True:\n    time.sleep(0.01)", timeout=1.5)
    assert result.limit == "wall" and not result.ok
    assert 1.5 <= time.monotonic() - t0 < 6
    _still_works(pool)


def test_busy_loop_is_killed_at_the_cpu_limit(pool):
    result = pool.run("while True:\n    pass", timeout=60)  # wall time is generous on a loaded machine
    assert result.limit == "cpu" and result.signal == signal.SIGXCPU, result
    # the kernel's SIGXCPU is the proof of the limit; the reported CPU time (the launcher's view of its child)
    # was seen 0.16 s short of it on a loaded machine
    assert LIMITS.cpu_seconds - 0.5 <= result.cpu_seconds < LIMITS.cpu_seconds + 1


def test_fork_bomb_is_held_to_the_process_limit_and_leaves_nothing_behind(pool):
    counted = pool.run(
        _code(
            """
            import os, time
            n = 0
            try:
                while True:
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    n += 1
            except OSError as e:
                print(n, e.errno)
            """
        )
    )
    started, err = map(int, counted.stdout.split())
    assert err == errno.EAGAIN and started < LIMITS.max_processes, counted
    assert counted.wall_seconds < 5  # its children sleeping 60 s died with the call's pid namespace
    bomb = pool.run(
        _code(
            """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """
        ),
        timeout=3,
    )
    assert bomb.limit in ("wall", "cpu"), bomb
    assert _leftovers() == []
    _still_works(pool)


def test_memory_hog_gets_a_memory_error(pool):
    result = pool.run("x = bytearray(2 << 30)\nprint(len(x))")
    assert result.limit == "memory" and "MemoryError" in result.stderr, result
    assert result.stdout == ""
    _still_works(pool)


def test_a_gigabyte_of_output_is_cut_at_the_limit(pool):
    t0 = time.monotonic()
    result = pool.run("import sys\nblock = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(block)")
    assert result.limit == "output" and result.truncated
    assert result.stdout.startswith("x" * 1000)
    assert result.stdout.endswith(f"[... output truncated: more than {LIMITS.max_output_bytes} bytes]\n")
    assert len(result.stdout) < LIMITS.max_output_bytes + 100
    assert time.monotonic() - t0 < 5


def test_the_environment_holds_none_of_the_runs_secrets(pool, monkeypatch):
    secrets = {
        "M2PO_API_KEY": "sk-m2po-secret-1",
        "WANDB_API_KEY": "wandb-secret-2",
        "HF_TOKEN": "hf-secret-3",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-4",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    result = pool.run(
        _code(
            """
            import os
            print(sorted(os.environ))
            for pid in os.listdir('/proc'):
                if pid.isdigit():
                    try:
                        print(open(f'/proc/{pid}/environ', 'rb').read())
                    except OSError as e:
                        print(pid, e)
            """
        )
    )
    assert result.ok, result
    for name, value in secrets.items():
        assert name not in result.stdout and value not in result.stdout
    assert "'PATH'" in result.stdout and "WANDB" not in result.stdout


@pytest.mark.parametrize("where", ["repo", "host_tmp", "home", "dev_shm"])
def test_writing_outside_its_directory_fails_or_stays_in_the_call(pool, tmp_path, where):
    target = {
        "repo": REPO / "sandbox-escape.txt",
        "host_tmp": tmp_path / "sandbox-escape.txt",
        "home": os.path.expanduser("~/sandbox-escape.txt"),
        "dev_shm": "/dev/shm/sandbox-escape.txt",
    }[where]
    tmp_path.chmod(0o777)  # writable by anyone: only the mount namespace keeps it out of reach
    result = pool.run(
        _code(
            f"""
            try:
                with open({str(target)!r}, 'w') as f:
                    f.write('escaped')
                print('wrote')
            except OSError as e:
                print('refused', e.errno)
            """
        )
    )
    assert result.exit_code == 0, result
    assert not os.path.exists(target), f"{target} was written from the sandbox"
    if where != "dev_shm":  # the call's own /dev/shm is a throwaway tmpfs; everything else is read-only
        assert result.stdout.startswith("refused"), result
    own = pool.run("open('mine.txt', 'w').write('x')\nimport os\nprint(os.getcwd(), sorted(os.listdir('.')))")
    assert own.ok and own.stdout == "/tmp ['main.py', 'mine.txt']\n", own
    again = pool.run("import os\nprint(os.listdir('.'))")
    assert again.stdout == "['main.py']\n"  # each call starts from an empty directory


def test_loopback_connection_never_reaches_a_listener(pool):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        result = pool.run(
            _code(
                f"""
                import socket
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect(('127.0.0.1', {port}))
                    print('connected')
                except OSError as e:
                    print('refused', e.errno)
                """
            )
        )
        assert result.stdout == f"refused {errno.ENETUNREACH}\n", result
        with pytest.raises(TimeoutError):
            listener.accept()


def test_other_addresses_have_no_route_and_no_interface(pool):
    result = pool.run(
        _code(
            """
            import socket, time
            for address in [('1.1.1.1', 53), ('10.0.0.1', 80), ('::1', 80)]:
                family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(5)
                t0 = time.monotonic()
                try:
                    s.connect(address)
                    print('connected')
                except OSError as e:
                    print(e.errno, round(time.monotonic() - t0, 1))
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.sendto(b'x', ('8.8.8.8', 53))
                print('sent')
            except OSError as e:
                print('udp', e.errno)
            print([name for _, name in socket.if_nameindex()])
            """
        )
    )
    lines = result.stdout.splitlines()
    # No route at all: the kernel refuses at once, before any packet could be built.
    assert lines[:2] == [f"{errno.ENETUNREACH} 0.0"] * 2, result
    assert lines[2] in (f"{errno.ENETUNREACH} 0.0", f"{errno.EADDRNOTAVAIL} 0.0")  # ::1 does not exist
    assert lines[3] == f"udp {errno.ENETUNREACH}"
    assert lines[4] == "['lo']"  # the namespace's own loopback, and it is down


def test_signalling_the_parent_or_everyone_touches_nothing_outside(pool):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = pool.run(
            _code(
                """
                import os, signal, subprocess
                print('ppid', os.getppid())
                for pid in (os.getppid(), 1):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError as e:
                        print('kill', pid, e.errno)
                subprocess.run(['kill', '-9', '-1'])
                """
            )
        )
        assert "ppid 1" in result.stdout, result  # its parent is the namespace's own pid 1
        assert bystander.poll() is None, "the sandboxed code killed a process outside it"
        _still_works(pool)
    finally:
        bystander.kill()
        bystander.wait()


def test_many_calls_at_once_finish_within_a_bound(pool):
    code = "import time\ntime.sleep(1)\nprint('done')"

    async def many(n: int) -> list[ToolResult]:
        return await asyncio.gather(*(pool.run_async(code) for _ in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(many(12))
    elapsed = time.monotonic() - t0
    assert all(r.ok and r.stdout == "done\n" for r in results)
    # 12 calls of 1 s on 4 workers: 3 rounds, not 12 (plus each call's start-up).
    assert elapsed < 3 * (1 + 2.0), elapsed
    metrics = pool.metrics()
    assert metrics["tool/calls"] >= 12 and metrics["tool/errors"] == 0


def test_refuses_to_start_where_it_cannot_isolate_unless_told():
    """In a user namespace that may create no more namespaces, the pool refuses, naming what is missing;
    `allow_unisolated` runs the code with the resource limits only, and says so."""
    script = _code(
        """
        from megatron_m2po.config import SandboxConfig
        from megatron_m2po.rollout.tools import SandboxPool, SandboxUnavailable
        try:
            SandboxPool(SandboxConfig())
            print('started')
        except SandboxUnavailable as e:
            print('refused:', e)
        with SandboxPool(SandboxConfig(allow_unisolated=True, cpu_seconds=1)) as pool:
            print(pool.capabilities.describe())
            r = pool.run('import os; print(os.getcwd()); print(sorted(os.environ))')
            print(r.stdout, r.exit_code)
            print(pool.run('while True: pass', timeout=10).limit)
        """
    )
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            f'echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c "$0"',
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(M2PO_API_KEY="sk-secret"),
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "refused: the Python tool sandbox cannot isolate code on this machine" in out
    assert "cannot create user namespace" in out and "sandbox.allow_unisolated=true" in out
    assert "UNISOLATED (resource limits only)" in out
    assert "/tmp/m2po-tool-" in out and "M2PO_API_KEY" not in out
    assert out.strip().endswith("cpu")


def test_config_section_is_validated(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\ndata: {path: d.jsonl}\nsandbox: {workers: 8, memory_mb: 2048}\n")
    cfg = load_config(recipe)
    validate(cfg)
    assert (cfg.sandbox.workers, cfg.sandbox.memory_mb, cfg.sandbox.allow_unisolated) == (8, 2048, False)
    for override, message in [
        ("sandbox.workers=0", "'sandbox.workers': must be >= 1"),
        ("sandbox.memory_mb=16", "'sandbox.memory_mb': must be >= 64"),
        ("sandbox.wall_seconds=0", "'sandbox.wall_seconds': must be > 0"),
        ("sandbox.max_procs=4", "sandbox.max_processes"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate(load_config(recipe, [override]))


def test_a_world_writable_unix_socket_of_the_host_is_out_of_reach(pool, tmp_path):
    """A read-only mount does not stop connect() on a unix socket: /run and /tmp are replaced instead."""
    paths = [Path("/run") / f"m2po-sandbox-test-{os.getpid()}.sock", tmp_path / "s.sock"]
    tmp_path.chmod(0o777)
    listeners = []
    try:
        for path in paths:
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            path.chmod(0o777)
            listener.listen(1)
            listener.settimeout(0.2)
            listeners.append(listener)
        code = "import socket\n" + "".join(
            f"s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({str(p)!r}); print('connected')\n"
            "except OSError as e:\n    print('refused', e.errno)\n"
            for p in paths
        )
        result = pool.run(code)
        assert result.stdout == f"refused {errno.ENOENT}\n" * 2, result
        for listener in listeners:
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        paths[0].unlink(missing_ok=True)


# The call gets a fresh /tmp: a checkout under the host's /tmp (as CI's may be) is not there at all.
_REPO_WRITE_ERRNO = errno.ENOENT if REPO.resolve().is_relative_to("/tmp") else errno.EROFS


def test_a_caller_without_root_maps_only_its_own_uid_and_is_isolated_alike(tmp_path):
    """Not root (uid 1000 in a user namespace): the sandbox maps the caller's own uid, gives up setgroups,
    and the code still finds no network, a read-only filesystem and its own /tmp."""
    script = _code(
        f"""
        import os
        from megatron_m2po.config import SandboxConfig
        from megatron_m2po.rollout.tools import SandboxPool
        print('caller', os.geteuid())
        with SandboxPool(SandboxConfig()) as pool:
            print(pool.capabilities.describe())
            print(pool.run('''
        import os, socket
        print(os.getuid(), os.getcwd())
        for target in ({str(REPO / "escape.txt")!r}, {str(tmp_path / "escape.txt")!r}):
            try:
                open(target, 'w')
            except OSError as e:
                print(e.errno)
        try:
            socket.create_connection(('1.1.1.1', 53), timeout=2)
        except OSError as e:
            print(e.errno)
        ''').stdout)
        """
    )
    tmp_path.chmod(0o777)
    proc = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "caller 1000",
        "isolated: namespaces user, mount, network, pid, ipc, uts; private /proc True; code runs as the caller's uid",
        "1000 /tmp",
        str(_REPO_WRITE_ERRNO),  # the repo: read-only, or absent where the checkout lies under the host's /tmp
        str(errno.ENOENT),  # the host's /tmp: not there, the call has its own
        str(errno.ENETUNREACH),
        "",
    ], proc.stdout
    assert not (REPO / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_a_call_whose_sandbox_is_killed_from_outside_is_an_error_result(pool):
    """Whatever kills a call's launcher (an OOM killer, an operator), the caller gets a ToolResult, the
    call's processes are gone and the next call runs."""
    future = pool.submit("import time\nprint('started', flush=True)\ntime.sleep(60)")
    _wait_for_launcher().kill()
    result = future.result(timeout=20)
    assert not result.ok and result.error and "without a status" in result.error, result
    assert result.wall_seconds < LIMITS.wall_seconds  # ended with the launcher, not at the wall limit
    time.sleep(0.2)
    assert _leftovers() == []
    _still_works(pool)


def test_what_the_model_reads_back(pool):
    assert pool.run("print(1)").as_text() == "1\n"
    failed = pool.run("print('partial', end='')\nraise SystemExit(3)").as_text()
    assert failed == "partial\n[exit status 3]\n"
    slow = pool.run("import time\nprint('a', flush=True)\ntime.sleep(10)", timeout=1).as_text()
    assert slow == "a\n[stopped: time limit exceeded]\n"
    error = pool.run("import sys\nsys.stderr.write('oops')\nraise SystemExit(1)").as_text()
    assert error == "oops\n[exit status 1]\n"


def test_a_closed_pool_answers_with_an_error_result():
    with SandboxPool(SandboxConfig(workers=1)) as closing:
        slow = closing.submit("import time\ntime.sleep(1)\nprint('ran')")
        queued = closing.submit("print('queued')")
        _wait_for_launcher()
        closing.close()
    assert slow.result().stdout == "ran\n"
    assert queued.result().error == "the Python tool pool is closed"
    assert closing.run("print(1)").error == "the Python tool pool is closed"


@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=20), st.integers(1, 200))
@example(b"x" * 10, [3, 3, 3, 3], 10)  # exactly at the limit: kept whole, not over
def test_bounded_reader_keeps_the_first_bytes_whatever_the_chunking(data, cuts, limit):
    reader, at = _BoundedReader(limit), 0
    for size in cuts + [len(data)]:
        reader.feed(data[at : at + size])
        at += size
    assert bytes(reader.kept) == data[:limit]
    assert reader.over == (len(data) > limit) and reader.seen == len(data)


def test_the_overhead_bench_runs_and_reports_ratios():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sandbox", "--calls", "2", "--workers", "2"],
        cwd=REPO,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {line[:40].strip(): line[40:].split() for line in proc.stdout.splitlines()[1:5]}
    assert rows["baseline: python -c pass"][1] == "1.00"
    assert float(rows["sandbox, isolated"][1]) > 0 and float(rows["sandbox, unisolated"][1]) > 0
    assert "pool of 2:" in proc.stdout
