"""SandboxPool over real local sandboxes."""

from __future__ import annotations

import asyncio

import pytest

from miles_envs.sandbox import SandboxPool, make_sandbox

from .conftest import TEST_LIMITS


@pytest.fixture
async def pool(backend):
    pool = SandboxPool(backend, size=2, limits=TEST_LIMITS, timeout=5)
    yield pool
    await pool.close()


async def test_pool_reuses_warm_sandboxes(pool):
    results = [await pool.run(f"print({i})") for i in range(5)]
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
    assert (pool.stats.created, pool.stats.reused, pool.idle) == (1, 4, 1)


async def test_many_concurrent_runs_share_a_bounded_pool(pool):
    results = await asyncio.gather(*(pool.run(f"print({i} * 2)") for i in range(20)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(20)]
    assert pool.stats.created <= 2


async def test_acquired_sandbox_is_reset_before_reuse(pool):
    async with pool.acquire() as box, box.session() as session:
        await session.run("open('mine.txt', 'w').write('private')")
    result = await pool.run("import os; print(os.listdir('.'))")
    assert result.stdout == "[]\n"
    assert pool.stats.created == 1


async def test_pool_session_keeps_state_within_and_not_across(pool):
    async with pool.session() as session:
        await session.run("z = 7")
        inside = await session.run("print(z)")
    async with pool.session() as session:
        across = await session.run("print('z' in globals())")
    assert (inside.stdout, across.stdout) == ("7\n", "False\n")


async def test_dead_sandbox_is_replaced(pool):
    await pool.run("import os, signal; os.kill(-1, signal.SIGKILL)")
    result = await pool.run("print('fresh')")
    assert result.stdout == "fresh\n"
    assert pool.stats.discarded == 1


async def test_sandboxes_past_their_ttl_or_uses_are_replaced(backend):
    async with SandboxPool(backend, size=1, max_uses=2, timeout=5) as pool:
        for _ in range(5):
            await pool.run("pass")
        assert (pool.stats.created, pool.stats.discarded) == (3, 2)
    async with SandboxPool(backend, size=1, ttl_s=0.0, timeout=5) as pool:
        await pool.run("pass")
        await pool.run("pass")
        assert pool.stats.created == 2


async def test_unhealthy_idle_sandbox_is_detected(backend):
    async with SandboxPool(backend, size=1, health_check_s=0.0, timeout=5) as pool:
        await pool.start()
        (warm,) = pool._idle
        await warm.sandbox._destroy()  # the sandbox dies while idle
        result = await pool.run("print('ok')")
        assert result.stdout == "ok\n"
        assert (pool.stats.created, pool.stats.discarded) == (2, 1)


async def test_pool_accepts_a_factory():
    async with SandboxPool(lambda: make_sandbox("local", timeout=5), size=1) as pool:
        assert (await pool.run("print(3)")).stdout == "3\n"


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 1"):
        SandboxPool("local", size=0)
    with pytest.raises(TypeError, match="factory"):
        SandboxPool(lambda: None, timeout=1)
