"""Sync env calls on their own workers: hung steps past their timeout starve no other env, and a
step spinning in Python is interrupted when its caller gives up."""

import asyncio
import os
import threading

from miles_envs import Env, user
from miles_envs.loop import with_timeout
from miles_envs.sync_workers import SyncWorkers

# More hung calls than asyncio's default executor has workers (min(32, cores + 4)).
HUNG = min(32, (os.cpu_count() or 1) + 4) + 4


class BlockingEnv(Env):
    """step() blocks until released: a hung env."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def reset(self, seed=None, options=None):
        return [user("go")], {}

    def step(self, action):
        self.release.wait()
        return [], 0.0, True, False, {}


class QuickEnv(Env):
    def reset(self, seed=None, options=None):
        return [user("go")], {}

    def step(self, action):
        return [user("done")], 1.0, True, False, {}


async def test_hung_sync_steps_past_their_timeout_leave_other_envs_running():
    release = threading.Event()
    try:
        hung = [BlockingEnv(release) for _ in range(HUNG)]
        for outcome in await asyncio.gather(
            *(with_timeout(env.astep({"role": "assistant", "content": "x"}), 0.05, "step") for env in hung),
            return_exceptions=True,
        ):
            assert isinstance(outcome, TimeoutError) and "did not finish" in str(outcome)
        # Every one of those calls is still blocked; a fresh env must still step.
        result = await asyncio.wait_for(QuickEnv().astep({"role": "assistant", "content": "x"}), 60)
        assert result == ([user("done")], 1.0, True, False, {})
    finally:
        release.set()


async def test_a_step_spinning_in_python_is_interrupted_when_its_caller_gives_up():
    workers = SyncWorkers()
    started, left = threading.Event(), threading.Event()

    def spin() -> None:
        started.set()
        try:
            while True:
                pass
        finally:
            left.set()

    task = asyncio.ensure_future(workers.run(spin))
    assert await asyncio.to_thread(started.wait, 60)
    task.cancel()
    assert await asyncio.to_thread(left.wait, 60)  # the call ended: its thread is free again
    while workers.idle_workers() != 1:  # the worker files itself as idle right after the call
        await asyncio.sleep(0.01)
    assert await workers.run(lambda: 41 + 1) == 42  # and takes the next call


async def test_results_exceptions_and_context_reach_the_caller():
    import contextvars

    workers = SyncWorkers()
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    assert await workers.run(var.get) == "caller's"

    def boom() -> None:
        raise KeyError("nope")

    try:
        await workers.run(boom)
    except KeyError as error:
        assert error.args == ("nope",)
    else:
        raise AssertionError("the exception did not reach the caller")
