"""RaySandboxPool on a real two-node Ray cluster started here (``ray start --head`` plus a worker
node on this machine, both stopped by PID): CodeExec episodes run on both nodes, and killing the
worker node mid-run fails its work over or fails it cleanly, with nothing hanging."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from miles_envs.envs.code_exec import CodeExecEnv  # noqa: E402
from miles_envs.sandbox.ray_pool import RaySandboxPool  # noqa: E402
from miles_envs.sandbox.reaper import ProcessTree  # noqa: E402

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
FIB = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"
# A private cluster on this machine: no auth token to hand around, fast detection of a dead node
# (the pool's own call bound covers a slow detection regardless).
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(process: subprocess.Popen) -> None:
    for pid in ProcessTree().below(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


class Cluster:
    """A head node (at the machine's address) and a worker node (at 127.0.0.2) on this machine, each
    a `ray start --block` process; the driver attaches to the head's address, so the worker can be killed."""

    def __init__(self) -> None:
        self.head = self.worker = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, **CLUSTER_ENV}
        common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
        self.head = subprocess.Popen(
            [*RAY, "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
             "--temp-dir", self.temp, *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        (self.head_node,) = self._wait_for_nodes(1)
        self.worker = subprocess.Popen(
            [*RAY, "start", "--address", self.address, "--node-ip-address", "127.0.0.2", *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        (self.worker_node,) = set(self._wait_for_nodes(2)) - {self.head_node}

    def _wait_for_nodes(self, count: int) -> list[str]:
        """The ids of the alive nodes once there are ``count`` of them."""
        probe = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                 "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))") % self.address
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, **CLUSTER_ENV})
            if done.returncode == 0:
                alive = json.loads(done.stdout.strip().splitlines()[-1])
                if len(alive) >= count:
                    return alive
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes")

    def kill_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            _kill_tree(self.worker)

    def stop(self) -> None:
        self.kill_worker()
        if self.head is not None:
            _kill_tree(self.head)
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    cluster = Cluster()
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        assert ray.get_runtime_context().get_node_id() == cluster.head_node
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _answer(code: str) -> dict:
    return {"role": "assistant", "content": f"```python\n{code}\n```"}


def _python(code: str) -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": code})}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


async def _function_episode(pool, tool_code: str = "print(6 * 7)") -> tuple[str, float]:
    env = CodeExecEnv(pool, timeout=20)
    await env.areset(options={"problem_id": "fibonacci"})
    obs, *_ = await env.astep(_python(tool_code))
    _, reward, terminated, *_ = await env.astep(_answer(FIB))
    assert terminated
    return obs[0]["content"], reward


async def _repo_episode(pool) -> tuple[float, dict]:
    env = CodeExecEnv(pool, family="repo", timeout=20)
    await env.areset(options={"task_id": "intervals-0"})
    fixed = ("def merge(intervals):\n    out = []\n    for s, e in sorted(intervals):\n        if out and s <= out[-1][1]:\n"
             "            out[-1][1] = max(out[-1][1], e)\n        else:\n            out.append([s, e])\n    return out\n")
    call = {"id": "w", "type": "function",
            "function": {"name": "write_file", "arguments": json.dumps({"path": "schedule/merge.py", "content": fixed})}}
    await env.astep({"role": "assistant", "content": None, "tool_calls": [call]})
    _, reward, terminated, _, info = await env.astep({"role": "assistant", "content": "done"})
    assert terminated
    return reward, info


def test_each_node_runs_its_own_docker_backend(cluster):
    """Runs before the node-kill test (file order), while both nodes are up."""
    from .conftest import docker_unavailable

    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)

    async def scenario():
        async with RaySandboxPool("docker", size_per_node=1, timeout=20) as pool:
            results = await asyncio.gather(*(pool.run(f"print({i} ** 2)") for i in range(6)))
            assert [r.stdout for r in results] == [f"{i ** 2}\n" for i in range(6)]
            assert set(pool.stats) == {cluster.head_node, cluster.worker_node}
            assert {m["created"] for m in (await pool.metrics()).values()} == {1}

    asyncio.run(scenario())


def test_codeexec_episodes_run_on_both_nodes_and_survive_a_node_kill(cluster):
    async def scenario():
        pool = RaySandboxPool("local", size_per_node=3, timeout=20, call_grace_s=10)
        await pool.start()
        assert sorted(pool.live_nodes) == sorted([cluster.head_node, cluster.worker_node])

        # Both task families, concurrently: least-loaded placement spreads them over both nodes.
        functions = await asyncio.gather(*(_function_episode(pool) for _ in range(6)))
        repos = await asyncio.gather(*(_repo_episode(pool) for _ in range(4)))
        assert functions == [("42", 1.0)] * 6
        assert [reward for reward, _ in repos] == [1.0] * 4
        assert set(pool.stats) == {cluster.head_node, cluster.worker_node} and min(pool.stats.values()) >= 4

        # Calls queued on a busy node past their timeout plus grace: the node answers pings, so it stays.
        busy = RaySandboxPool("local", size_per_node=1, timeout=1.0, call_grace_s=1.0)
        await busy.start()
        queued = await asyncio.gather(*(busy.run("import time; time.sleep(1.5); print('ok')", timeout=3.0)
                                        for _ in range(6)))
        assert [r.stdout for r in queued] == ["ok\n"] * 6 and busy.lost == [] and len(busy.live_nodes) == 2
        await busy.close()

        # One session per node, each holding a file; then episodes and both sessions inside a 4 s
        # execution when the worker node is killed.
        async with AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(pool.session()) for _ in range(2)]
            assert {s.node_id for s in sessions} == {cluster.head_node, cluster.worker_node}
            for s in sessions:
                assert (await s.run("echo kept > note.txt", language="bash")).ok
            slow = "import time; time.sleep(4); print('slept')"
            episodes = [asyncio.create_task(_function_episode(pool, slow)) for _ in range(4)]
            session_runs = [asyncio.create_task(s.run("sleep 4; cat note.txt", language="bash")) for s in sessions]
            await asyncio.sleep(2.0)
            cluster.kill_worker()
            done = await asyncio.wait_for(asyncio.gather(*episodes, *session_runs), timeout=120)  # nothing hangs
            by_node = {s.node_id: result for s, result in zip(sessions, done[4:])}
            after = {s.node_id: await s.run("cat note.txt", language="bash") for s in sessions}

        assert pool.live_nodes == [cluster.head_node] and len(pool.lost) == 1
        # Stateless runs failed over: each episode's tool call and grading still completed.
        assert done[:4] == [("slept", 1.0)] * 4
        # The head's session kept its state; the worker's failed cleanly, saying why.
        assert by_node[cluster.head_node].stdout == "kept\n" and after[cluster.head_node].stdout == "kept\n"
        for result in (by_node[cluster.worker_node], after[cluster.worker_node]):
            assert result.status == "sandbox_error" and "was lost; its files and state are gone" in result.error
        # New work runs on the surviving node.
        assert await _function_episode(pool) == ("42", 1.0)
        assert (await _repo_episode(pool))[0] == 1.0
        await pool.close()

    asyncio.run(scenario())
