import asyncio
import threading

import pytest

from miles_envs import Env, assistant, user


class SyncEnv(Env):
    def reset(self, seed=None, options=None):
        self.thread = threading.current_thread().name
        return [user(f"seed={seed}")], {}

    def step(self, action):
        return [user("echo: " + action["content"])], 1.0, True, False, {}


class AsyncEnv(Env):
    def __init__(self):
        self.loops = set()

    async def areset(self, seed=None, options=None):
        self.loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0)
        return [user(f"seed={seed}")], {"tools": []}

    async def astep(self, action):
        self.loops.add(id(asyncio.get_running_loop()))
        return [user("echo: " + action["content"])], 0.5, False, True, {}


class NothingEnv(Env):
    pass


async def test_sync_env_driven_async_runs_off_the_event_loop():
    env = SyncEnv()
    obs, _ = await env.areset(seed=3)
    assert obs == [user("seed=3")]
    assert env.thread != threading.current_thread().name
    assert await env.astep(assistant("x")) == ([user("echo: x")], 1.0, True, False, {})


def test_async_env_driven_sync_keeps_one_private_loop():
    env = AsyncEnv()
    assert env.reset(seed=1) == ([user("seed=1")], {"tools": []})
    assert env.step(assistant("y")) == ([user("echo: y")], 0.5, False, True, {})
    assert len(env.loops) == 1, "loop-bound resources must survive between sync calls"
    env.close()
    env.close()


async def test_async_env_driven_sync_from_inside_a_running_loop():
    env = AsyncEnv()
    assert env.reset(seed=2)[0] == [user("seed=2")]
    env.close()


def test_env_implementing_neither_flavour_says_so():
    with pytest.raises(NotImplementedError, match="neither reset"):
        NothingEnv().reset()
    with pytest.raises(NotImplementedError, match="neither step"):
        asyncio.run(NothingEnv().astep(assistant("x")))
