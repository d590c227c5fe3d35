"""The ``local`` backend: bubblewrap namespaces around a warm runner, no daemon needed.

Isolation: new user/pid/net/ipc/uts/cgroup namespaces, only the interpreter's directories bound
read-only (``/usr/bin``, ``/usr/lib``: no home, no host ``/tmp``, no ``/etc``), a read-only root,
private size-limited tmpfs for ``/work`` and ``/tmp``, an empty environment, ``--die-with-parent``.
When the host process is root, bubblewrap itself runs as ``nobody`` so the sandbox holds no host
privilege at all and the process-count rlimit is enforced (the kernel exempts root from it). Each
execution gets rlimits and a wall-clock kill of every process in the namespace (see runner.py);
cgroup v2 memory and pids limits are added where the cgroup tree is writable. The bubblewrap
process carries the run id in its environment (cleared inside), so the reaper finds it and the
namespace below it if this process dies without closing it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import ClassVar

from miles_envs.sandbox.base import Limits, SandboxError
from miles_envs.sandbox.cgroups import SandboxCgroup
from miles_envs.sandbox.reaper import RUN_ENV, cgroup_prefix, current_run, reap_once
from miles_envs.sandbox.runner_client import RUNNER_SOURCE, RunnerChannel, RunnerSandbox

NOBODY = 65534
INSTALL_HINT = "bubblewrap (bwrap) is not installed: apt-get install bubblewrap (or dnf/pacman install bubblewrap)"
# Host directories the interpreter and a shell need, bound read-only at the same place.
READONLY_DIRS = ("/usr/bin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/etc/alternatives")
ROOT_LINKS = ("/bin", "/lib", "/lib64", "/sbin")


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError(INSTALL_HINT)
    return path


def filesystem_args() -> list[str]:
    args: list[str] = []
    for path in READONLY_DIRS:
        if Path(path).is_dir():
            args += ["--ro-bind", path, path]
    for path in ROOT_LINKS:
        p = Path(path)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), path]
        elif p.is_dir():
            args += ["--ro-bind", path, path]
    return args


class LocalSandbox(RunnerSandbox):
    """Runs code under bubblewrap on this machine. See the module docstring for what is isolated."""

    backend: ClassVar[str] = "local"
    startup_timeout_s: ClassVar[float] = 10.0

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        timeout: float = 10.0,
        python: str = "/usr/bin/python3",
        workdir_mb: int = 64,
        run_as_nobody: bool | None = None,
    ) -> None:
        super().__init__(limits=limits, timeout=timeout)
        self.bwrap = find_bwrap()
        if not Path(python).is_file():
            raise SandboxError(f"sandbox interpreter {python} not found; pass python=/path/to/python3")
        self.python = python
        self.workdir_mb = workdir_mb
        self.run_as_nobody = os.geteuid() == 0 if run_as_nobody is None else run_as_nobody
        self._process: asyncio.subprocess.Process | None = None
        self._cgroup: SandboxCgroup | None = None
        reap_once(self.backend)

    def command(self) -> list[str]:
        size = str(self.workdir_mb * 1024 * 1024)
        return [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/work",
            "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            *filesystem_args(),
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", size, "--tmpfs", "/work",
            "--size", size, "--tmpfs", "/tmp",
            "--remount-ro", "/",
            "--chdir", "/work",
            self.python, "-I", "-S", "-c", RUNNER_SOURCE,
        ]  # fmt: skip

    async def _spawn(self) -> RunnerChannel:
        self._cgroup = SandboxCgroup.create(self.limits, prefix=cgroup_prefix())
        self._process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={RUN_ENV: current_run().marker},
            cwd="/",
            start_new_session=True,
            **self._identity(),
        )
        assert self._process.stdout is not None
        return RunnerChannel(self._process.stdout, self._process.stdin)

    def _identity(self) -> dict:
        """subprocess arguments that drop to nobody and, first, join the cgroup (which needs root).

        uvloop (the loop of Ray's async actors and of our server stack) takes no ``user``/``group``
        arguments, so under it the drop happens in ``preexec_fn`` as the cgroup join does."""
        cgroup = self._cgroup
        if cgroup is None and (not self.run_as_nobody or isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)):
            return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if self.run_as_nobody else {}

        def join_cgroup_then_drop() -> None:
            if cgroup is not None:
                cgroup.add(os.getpid())
            if self.run_as_nobody:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)

        return {"preexec_fn": join_cgroup_then_drop}

    async def _destroy(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                # bwrap's init inside dies with it (--die-with-parent), taking the namespace down.
                process.kill()
            await process.wait()
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            cgroup.remove()

    async def _diagnostics(self) -> str:
        process = self._process
        if process is None or process.stderr is None:
            return ""
        try:
            await asyncio.wait_for(process.wait(), 1.0)
            data = await asyncio.wait_for(process.stderr.read(), 1.0)
        except asyncio.TimeoutError:
            return "(the sandbox process is still running)"
        return data[-2000:].decode("utf-8", "replace").strip()
