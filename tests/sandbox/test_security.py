"""Hostile code against local and docker sandboxes: each attack is contained, the host is
unaffected, nothing keeps running, and the ExecResult says what happened."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from miles_envs.sandbox import Limits

COUNT_PROCESSES = "import os; print(sum(p.isdigit() for p in os.listdir('/proc')))"
# Inside, only the namespace's init, the runner and the child counting them.
IDLE_PROCESS_COUNT = "3\n"


def host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


async def assert_sandbox_idle(sandbox):
    result = await sandbox.run(COUNT_PROCESSES)
    assert result.stdout == IDLE_PROCESS_COUNT, result


def assert_host_can_fork():
    assert subprocess.run(["true"]).returncode == 0


async def test_fork_bomb_is_capped_and_cleaned_up(sandbox):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = await sandbox.run(bomb, timeout=2, limits=Limits(pids=16, cpu_s=5))
    assert result.status == "timeout"
    assert_host_can_fork()
    await assert_sandbox_idle(sandbox)


async def test_memory_bomb_is_reported_as_oom(sandbox):
    result = await sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))", timeout=10,
                               limits=Limits(memory_mb=128))  # fmt: skip
    assert result.status == "oom"
    assert result.oom_killed
    await assert_sandbox_idle(sandbox)


async def test_busy_loop_hits_the_wall_clock(sandbox):
    result = await sandbox.run("while True: pass", timeout=0.5)
    assert (result.status, result.exit_code) == ("timeout", -9)
    await assert_sandbox_idle(sandbox)


async def test_busy_loop_hits_the_cpu_limit(sandbox):
    result = await sandbox.run("while True: pass", timeout=10, limits=Limits(cpu_s=1))
    assert not result.timed_out
    assert result.exit_code == -24  # SIGXCPU


async def test_disk_fill_stops_at_the_file_and_workdir_limits(sandbox):
    big_file = await sandbox.run("open('big', 'wb').write(b'x' * 8 * 2**20)", limits=Limits(file_mb=4))
    assert "File too large" in big_file.stderr
    many_files = await sandbox.run(
        "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1", limits=Limits(file_mb=4)
    )
    assert "No space left on device" in many_files.stderr
    assert (await sandbox.run("import os; print(os.listdir('.'))")).stdout == "[]\n"


async def test_no_network_egress_to_the_host(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        result = await sandbox.run(
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
            "except OSError as e:\n    print('refused', type(e).__name__)"
        )
        assert result.stdout.startswith("refused")
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


async def test_secret_files_in_tmp_and_home_are_invisible(sandbox):
    secret = uuid.uuid4().hex
    paths = [Path("/tmp") / f"miles-secret-{secret}", Path.home() / f".miles-secret-{secret}"]
    for path in paths:
        path.write_text(secret)
    try:
        code = "\n".join(
            f"try:\n    print(open({str(p)!r}).read())\nexcept OSError as e:\n    print(type(e).__name__)" for p in paths
        )
        result = await sandbox.run(code)
    finally:
        for path in paths:
            path.unlink()
    assert secret not in result.stdout
    assert len(result.stdout.split()) == 2
    assert set(result.stdout.split()) <= {"FileNotFoundError", "PermissionError"}


async def test_parent_environment_is_not_inherited(backend, monkeypatch):
    from miles_envs.sandbox import make_sandbox

    secret = uuid.uuid4().hex
    monkeypatch.setenv("MILES_TEST_SECRET", secret)
    box = make_sandbox(backend, timeout=5)
    try:
        result = await box.run(
            "import os\nprint(dict(os.environ))\nfor p in os.listdir('/proc'):\n    try:\n"
            "        print(open(f'/proc/{p}/environ').read())\n    except OSError:\n        pass"
        )
    finally:
        await box.close()
    assert result.exit_code == 0
    assert secret not in result.stdout


async def test_writes_outside_the_workdir_fail_or_stay_inside(sandbox):
    marker = f"miles-marker-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        "for path in ['/usr/bin/evil', '/etc/evil', '/evil', '/proc/evil']:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('denied', path)\n"
        f"open('/tmp/{marker}', 'w').write('x')\n"
    )
    result = await sandbox.run(code)
    assert result.exit_code == 0, result
    assert "wrote" not in result.stdout
    assert not (Path("/tmp") / marker).exists()


async def test_killing_the_parent_fails_and_the_host_survives(sandbox):
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in ({me}, os.getppid()):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print(type(e).__name__)\n"
        "os.kill(-1, signal.SIGKILL)\n"
    )
    result = await sandbox.run(code)
    # kill(-1) takes the runner down with it: the sandbox reports that and restarts on next use.
    assert result.status in ("killed", "sandbox_error")
    assert_host_can_fork()
    assert (await sandbox.run("print('alive')")).stdout == "alive\n"


async def test_symlink_escape_reads_nothing_from_the_host(sandbox):
    secret = uuid.uuid4().hex
    target = Path("/tmp") / f"miles-target-{secret}"
    target.write_text(secret)
    try:
        result = await sandbox.run(
            f"import os\nos.symlink({str(target)!r}, 'link')\ntry:\n    print(open('link').read())\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
        )
    finally:
        target.unlink()
    assert secret not in result.stdout
    assert result.stdout.startswith("FileNotFoundError\n")


async def test_host_processes_are_not_visible(sandbox):
    result = await sandbox.run(
        "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "cmds = [open(f'/proc/{p}/cmdline','rb').read() for p in pids]\n"
        "print(len(pids), any(b'pytest' in c for c in cmds))"
    )
    assert result.stdout == "3 False\n"


async def test_daemonized_child_does_not_outlive_the_call(sandbox):
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    code = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
        "os.wait()\nprint('parent done')"
    )
    result = await sandbox.run(code)
    assert result.stdout == "parent done\n"
    assert host_processes_with(marker) == []
    await assert_sandbox_idle(sandbox)


async def test_code_cannot_reach_the_runners_channel_to_the_host(sandbox):
    result = await sandbox.run(
        "import os\ntry:\n    print(os.listdir(f'/proc/{os.getppid()}/fd'))\nexcept OSError as e:\n"
        "    print(type(e).__name__)"
    )
    assert result.stdout == "PermissionError\n"


def test_local_sandbox_drops_to_nobody_under_uvloop_too():
    """uvloop (Ray's async actors, the server stack) takes no user/group arguments for subprocesses."""
    import asyncio

    uvloop = pytest.importorskip("uvloop")
    if os.geteuid() != 0:
        pytest.skip("dropping to nobody needs root")
    from miles_envs.sandbox import make_sandbox

    async def identity() -> tuple[str, str]:
        box = make_sandbox("local")
        try:
            result = await box.run("import os; print(os.getuid(), os.getgid(), os.getgroups())")
            return result.stdout, result.status
        finally:
            await box.close()

    assert uvloop.run(identity()) == asyncio.run(identity()) == ("65534 65534 []\n", "ok")
