"""Leak-proof teardown across crashes: run ids, leftovers and the reaper.

Every process that starts sandboxes is a *run*, with an id and a directory under the state folder
(``$MILES_ENVS_SANDBOX_STATE``, default ``/tmp/miles-envs-sandbox``) holding a lock file the run
keeps ``flock``-ed while it lives. The kernel drops that lock when the process dies, SIGKILL
included, so "lock not held" means "run dead" with no pid reuse to fool it. What a run creates on
the host carries its id: the bubblewrap process's environment (``MILES_ENVS_SANDBOX_RUN`` = the
run directory; the namespace inside descends from it), docker container labels, cgroup names, temp
dirs under the run directory. The first sandbox backend created in a process calls
:func:`reap_dead_runs`, which finds what dead runs of the same state folder left (processes and
their descendants, containers of this host, mounts, cgroups, temp dirs) and removes it; live runs,
and runs of other state folders, are never touched.

    python -m miles_envs.sandbox.reaper      # reap now and print what was removed
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles_envs.sandbox.cgroups import CGROUP_ROOT, PARENT_NAME, SandboxCgroup

RUN_ENV = "MILES_ENVS_SANDBOX_RUN"
RUN_LABEL = "miles-envs.run"
HOST_LABEL = "miles-envs.host"
SANDBOX_LABEL = "miles-envs.sandbox"
STATE_LABEL = "miles-envs.state"
LOCK_NAME = "lock"
# A run directory being set up is named ".new-<id>" until its lock is held; older ones are debris.
NEW_PREFIX = ".new-"
NEW_GRACE_S = 60.0


def state_dir() -> Path:
    return Path(os.environ.get("MILES_ENVS_SANDBOX_STATE", "/tmp/miles-envs-sandbox")).absolute()


def state_key() -> str:
    """A short name of the state folder, for places that cannot hold a path (cgroup names)."""
    return hashlib.sha1(str(state_dir()).encode()).hexdigest()[:8]


@dataclass
class Run:
    """This process's run: its id, its directory, and the open lock file that proves it alive."""

    id: str
    dir: Path
    pid: int
    _lock_fd: int

    @property
    def marker(self) -> str:
        """The value of ``MILES_ENVS_SANDBOX_RUN`` in the environment of the processes it starts."""
        return str(self.dir)


_run: Run | None = None
_run_lock = threading.Lock()
_reaped: set[str] = set()


def current_run() -> Run:
    """This process's run, created on first use (again in a forked child, which is another
    process, and when the state folder setting changes)."""
    global _run
    with _run_lock:
        if _run is None or _run.pid != os.getpid() or _run.dir.parent != state_dir():
            _run = _new_run()
        return _run


def _new_run() -> Run:
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    run_id = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
    staging = root / f"{NEW_PREFIX}{run_id}"
    staging.mkdir(mode=0o755)
    fd = os.open(staging / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    final = root / run_id
    staging.rename(final)
    run = Run(run_id, final, os.getpid(), fd)
    atexit.register(_remove_run_dir, run)
    return run


def _remove_run_dir(run: Run) -> None:
    """At a normal exit the run directory goes; after a crash the reaper removes it."""
    if run.pid == os.getpid():
        shutil.rmtree(run.dir, ignore_errors=True)
        os.close(run._lock_fd)


def run_alive(run_id: str) -> bool:
    """True while the process of ``run_id`` holds its lock (our own run counts as alive)."""
    if _run is not None and _run.id == run_id and _run.pid == os.getpid():
        return True
    try:
        fd = os.open(state_dir() / run_id / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- finding what a run left -----------------------------------------------------------------------
def process_parents() -> dict[int, int]:
    """pid -> parent pid for every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _run_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{RUN_ENV}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


class ProcessTree:
    """A snapshot of the process table that answers "this process and everything below it"."""

    def __init__(self) -> None:
        self.parents = process_parents()
        self.children: dict[int, list[int]] = {}
        for pid, parent in self.parents.items():
            self.children.setdefault(parent, []).append(pid)

    def below(self, root: int) -> list[int]:
        """``root`` and all its descendants, parents first."""
        found, index = [root], 0
        while index < len(found):
            found += self.children.get(found[index], ())
            index += 1
        return found


def run_processes() -> dict[str, set[int]]:
    """Run id -> the processes it started (marked) and all their descendants, for the runs of
    this state folder."""
    tree = ProcessTree()
    found: dict[str, set[int]] = {}
    root = state_dir()
    for pid in tree.parents:
        marker = _run_of(pid)
        if marker is not None and Path(marker).parent == root:
            found.setdefault(Path(marker).name, set()).update(tree.below(pid))
    return found


def run_containers(client: Any, run_id: str | None = None) -> list[Any]:
    """This host's sandbox containers (of ``run_id`` when given), running or not."""
    labels = [SANDBOX_LABEL, f"{HOST_LABEL}={socket.gethostname()}", f"{STATE_LABEL}={state_dir()}"]
    if run_id is not None:
        labels.append(f"{RUN_LABEL}={run_id}")
    # sparse: no inspect per container, which would race with containers being removed.
    return client.containers.list(all=True, sparse=True, filters={"label": labels})


def run_mounts(run_id: str) -> list[str]:
    """Host mount points under the run's directory (the backends make none; this proves it)."""
    run_dir = str(state_dir() / run_id)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == run_dir or point.startswith(run_dir + "/"):
            mounts.append(point)
    return mounts


def cgroup_prefix() -> str:
    """How this run's cgroups are named: ``<state folder key>.<run id>.``, read back by the reaper."""
    return f"{state_key()}.{current_run().id}."


def run_cgroups(run_id: str | None = None) -> list[Path]:
    parent = CGROUP_ROOT / PARENT_NAME
    if not parent.is_dir():
        return []
    prefix = f"{state_key()}.{run_id or ''}"
    return [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)]


def leftovers(run_id: str, docker: Any = None) -> dict[str, list]:
    """Everything on this host that still carries ``run_id``: processes, containers (when a docker
    client is given), mounts, temp dirs (the run directory) and cgroups."""
    run_dir = state_dir() / run_id
    return {
        "processes": sorted(run_processes().get(run_id, ())),
        "containers": [c.id for c in run_containers(docker, run_id)] if docker is not None else [],
        "mounts": run_mounts(run_id),
        "temp_dirs": [str(run_dir)] if run_dir.exists() else [],
        "cgroups": [str(p) for p in run_cgroups(run_id)],
    }


# -- removing it -----------------------------------------------------------------------------------
def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _remove_container(container: Any) -> bool:
    """Force-remove; False when it is already gone or another reaper is removing it."""
    import docker

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        if error.status_code == 409:  # removal already in progress
            return False
        raise
    return True


def _unmount(point: str) -> None:
    subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def reap_dead_runs(docker: Any = None) -> dict[str, int]:
    """Remove what dead runs left on this host; return how many of each kind were removed."""
    removed = {"runs": 0, "processes": 0, "containers": 0, "mounts": 0, "temp_dirs": 0, "cgroups": 0}
    dead: set[str] = set()
    for run_id, pids in run_processes().items():
        if not run_alive(run_id):
            dead.add(run_id)
            _kill(pids)
            removed["processes"] += len(pids)
    if docker is not None:
        for container in run_containers(docker):
            run_id = (container.attrs.get("Labels") or {}).get(RUN_LABEL)
            if run_id and not run_alive(run_id):
                dead.add(run_id)
                if _remove_container(container):
                    removed["containers"] += 1
    for cgroup in run_cgroups():
        run_id = cgroup.name.split(".")[1]
        if not run_alive(run_id):
            dead.add(run_id)
            SandboxCgroup(cgroup).remove()
            removed["cgroups"] += 1
    root = state_dir()
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(NEW_PREFIX):
                age = _age_s(entry)
                if age is not None and age > NEW_GRACE_S:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if run_alive(entry.name):
                continue
            dead.add(entry.name)
            for point in run_mounts(entry.name):
                _unmount(point)
                removed["mounts"] += 1
            shutil.rmtree(entry, ignore_errors=True)
            removed["temp_dirs"] += 1
    removed["runs"] = len(dead)
    return removed


def _age_s(entry: Path) -> float | None:
    """Seconds since ``entry`` last changed; None once it is gone (a run being created in another
    process renames its ``.new-`` folder, and another reaper may remove it, while this one lists)."""
    try:
        return time.time() - entry.stat().st_mtime
    except FileNotFoundError:
        return None


def reap_once(backend: str, docker: Any = None) -> None:
    """The reaper at backend start: once per backend per process."""
    key = f"{os.getpid()}:{backend}"
    if key in _reaped:
        return
    _reaped.add(key)
    reap_dead_runs(docker)


def main() -> None:
    docker = None
    try:
        from miles_envs.sandbox.docker_client import docker_client

        docker = docker_client()
    except Exception:
        pass
    print(json.dumps(reap_dead_runs(docker)))


if __name__ == "__main__":
    main()
