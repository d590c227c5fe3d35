"""Leak-proof teardown: a run killed with SIGKILL mid-execution leaves nothing once a backend
starts again; the reaper never touches a live run; cgroup limits where the machine delegates them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from miles_envs.sandbox import make_sandbox
from miles_envs.sandbox.cgroups import SandboxCgroup
from miles_envs.sandbox.docker_backend import docker_client
from miles_envs.sandbox.reaper import NEW_GRACE_S, NEW_PREFIX, current_run, leftovers, reap_dead_runs, state_dir

from .conftest import TEST_LIMITS, docker_unavailable

# The run to kill: pools of both backends, every sandbox busy in a long execution that also leaves
# a detached process behind, so the kill lands mid-run.
VICTIM = """
import asyncio, json, sys
from miles_envs.sandbox import SandboxPool
from miles_envs.sandbox.reaper import current_run

BUSY = "import subprocess, time; subprocess.Popen(['sleep', '600'], start_new_session=True); time.sleep(600)"

async def main(backends):
    pools = [SandboxPool(backend, size=3, timeout=600) for backend in backends]

    async def busy(pool):
        async with pool.session() as session:
            await session.run(BUSY, timeout=600)

    tasks = [asyncio.create_task(busy(pool)) for pool in pools for _ in range(pool.size)]
    print(json.dumps({"run": current_run().id}), flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main(sys.argv[1:]))
"""
RESTART = "from miles_envs.sandbox import make_sandbox; [make_sandbox(b) for b in __import__('sys').argv[1:]]"


def _python(code: str, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def _wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what} after {timeout_s:g} s")


@pytest.fixture
def private_state(tmp_path, monkeypatch):
    """A state folder of its own, so this test's reaper sees only this test's runs."""
    path = tmp_path / "state"
    monkeypatch.setenv("MILES_ENVS_SANDBOX_STATE", str(path))
    return {**os.environ, "MILES_ENVS_SANDBOX_STATE": str(path)}


def test_sigkill_mid_run_then_restart_leaves_nothing(private_state):
    backends = ["local"] + ([] if docker_unavailable() else ["docker"])
    docker = docker_client() if "docker" in backends else None
    victim = _python(VICTIM, *backends, env=private_state)
    try:
        run_id = json.loads(victim.stdout.readline())["run"]
        per_backend = 3

        def all_busy():
            found = leftovers(run_id, docker)
            # Each local sandbox: bwrap, its init, the runner, the forked code, the detached sleep.
            local_busy = len(found["processes"]) >= per_backend * 5
            return found if local_busy and len(found["containers"]) == per_backend * (docker is not None) else None

        before = _wait_until(all_busy, 120, "every sandbox to be busy")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert before["temp_dirs"] == [str(state_dir() / run_id)]

    after_kill = leftovers(run_id, docker)
    assert after_kill["temp_dirs"], "the dead run's directory is the record the reaper needs"
    if docker is not None:
        assert len(after_kill["containers"]) == per_backend, "containers outlive the parent; the reaper must remove them"

    restart = _python(RESTART, *backends, env=private_state)
    assert restart.wait(timeout=120) == 0
    assert leftovers(run_id, docker) == {"processes": [], "containers": [], "mounts": [], "temp_dirs": [], "cgroups": []}


async def test_reaper_leaves_live_runs_alone(private_state):
    sandbox = make_sandbox("local", limits=TEST_LIMITS, timeout=5)
    try:
        await sandbox.start()
        live = leftovers(current_run().id)
        assert live["processes"] and live["temp_dirs"]
        removed = reap_dead_runs(docker_client() if not docker_unavailable() else None)
        assert removed["processes"] == 0 and removed["containers"] == 0
        assert (await sandbox.run("print('still here')")).stdout == "still here\n"
    finally:
        await sandbox.close()
    assert leftovers(current_run().id)["processes"] == []


def test_reaper_passes_over_a_run_folder_that_vanishes_while_it_lists(private_state):
    """Another process renames its ``.new-`` folder (or reaps it) between the listing and the look."""
    root = state_dir()
    root.mkdir(parents=True)
    vanishing = root / f"{NEW_PREFIX}4242-gone"
    vanishing.symlink_to(root / "renamed-away")  # listed, but stat() finds nothing: the race, made still
    old = root / f"{NEW_PREFIX}4343-old"
    old.mkdir()
    os.utime(old, (time.time() - NEW_GRACE_S - 5,) * 2)
    reap_dead_runs(None)
    assert vanishing.is_symlink() and not old.exists()


def _delegated_cgroup_reason() -> str | None:
    cgroup = SandboxCgroup.create(TEST_LIMITS)
    if cgroup is None:
        return ("no cgroup v2 with the memory and pids controllers is delegated on this machine "
                "(/sys/fs/cgroup is not a writable cgroup2 tree with them); rlimits only")
    cgroup.remove()
    return None


async def test_cgroup_v2_memory_and_pids_limits_hold_the_sandbox_where_delegated(private_state):
    reason = _delegated_cgroup_reason()
    if reason:
        pytest.skip(reason)
    box = make_sandbox("local", limits=TEST_LIMITS, timeout=5)
    try:
        await box.start()
        cgroup = box._cgroup
        assert cgroup is not None
        assert (cgroup.path / "pids.max").read_text().strip() == str(TEST_LIMITS.pids + 4)
        assert (cgroup.path / "memory.max").read_text().strip() == str(TEST_LIMITS.memory_mb * 1024 * 1024)
        assert len((cgroup.path / "cgroup.procs").read_text().split()) >= 3  # bwrap, its init, the runner
        assert leftovers(current_run().id)["cgroups"] == [str(cgroup.path)]
    finally:
        await box.close()
    assert leftovers(current_run().id)["cgroups"] == []
