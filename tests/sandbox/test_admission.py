"""Start admission and budgets on real local sandboxes: the start cap holds under a burst, an
overrun start budget is a clean failure, waiting shows in the metrics, episodes stay in budget."""

from __future__ import annotations

import asyncio

import pytest

from miles_envs.sandbox import ExecResult, SandboxError, SandboxPool, make_sandbox
from miles_envs.sandbox.admission import LatencyStats, StartGate
from miles_envs.sandbox.budget import SandboxBudget
from miles_envs.sandbox.reaper import current_run, leftovers

from .conftest import TEST_LIMITS


class StartWatcher:
    """Builds real local sandboxes and counts, from outside the pool, how many are starting at once."""

    def __init__(self) -> None:
        self.now = self.peak = self.total = 0

    def factory(self):
        sandbox = make_sandbox("local", limits=TEST_LIMITS, timeout=5)
        start = sandbox.start

        async def watched_start() -> None:
            if sandbox.started:
                return
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)
            try:
                await start()
            finally:
                self.now -= 1

        sandbox.start = watched_start
        return sandbox


async def test_start_cap_holds_under_a_burst_of_1000_session_requests():
    watcher = StartWatcher()
    size, cap, requests = 32, 3, 1000
    # max_uses keeps replacing sandboxes during the burst, so starts go on all along.
    async with SandboxPool(watcher.factory, size=size, max_starting=cap, max_uses=10) as pool:

        async def session(i: int) -> str:
            async with pool.session() as s:
                return (await s.run(f"print({i} * 3)")).stdout

        outputs = await asyncio.gather(*(session(i) for i in range(requests)))
        metrics = pool.metrics()
    assert outputs == [f"{i * 3}\n" for i in range(requests)]
    assert watcher.peak == cap  # reached, never passed
    assert watcher.total == metrics["created"] >= requests // 10
    assert metrics["starting_max"] == cap and metrics["start_failures"] == 0
    # Every request beyond the pool size queued at once; every holder beyond the cap queued to start.
    assert metrics["queue_depth_max"] == requests - size
    assert metrics["start_queue_depth_max"] == size - cap
    assert metrics["wait_count"] == requests and metrics["queue_depth"] == 0
    assert 0 < metrics["wait_p50_ms"] <= metrics["wait_p99_ms"] <= metrics["wait_max_ms"]
    assert metrics["start_wait_max_ms"] > 0


async def test_start_over_budget_fails_cleanly_and_leaves_nothing():
    before = set(leftovers(current_run().id)["processes"])  # sandboxes other tests of this run hold
    async with SandboxPool("local", size=2, start_budget_s=0.001, limits=TEST_LIMITS, timeout=5) as pool:
        with pytest.raises(SandboxError, match="did not start within start_budget_s=0.001 s"):
            async with pool.session():
                pass
        assert pool.metrics()["start_failures"] == 1
        assert pool.metrics()["created"] == 0
    assert set(leftovers(current_run().id)["processes"]) <= before


async def test_waiting_longer_than_the_wait_budget_is_a_clear_error():
    async with SandboxPool("local", size=1, wait_budget_s=0.2, limits=TEST_LIMITS, timeout=5) as pool:
        async with pool.session() as held:
            with pytest.raises(SandboxError, match=r"no sandbox free within wait_budget_s=0.2 s \(pool size 1"):
                async with pool.session():
                    pass
            assert (await held.run("print('still mine')")).stdout == "still mine\n"
        assert pool.metrics()["wait_timeouts"] == 1 and pool.metrics()["queue_depth"] == 0
        assert (await pool.run("print(2)")).stdout == "2\n"  # the slot was not lost


def test_gate_and_budget_reject_bad_settings():
    with pytest.raises(ValueError, match="max_starting"):
        StartGate(max_starting=0)
    with pytest.raises(ValueError, match="start_budget_s"):
        StartGate(start_budget_s=0)
    with pytest.raises(ValueError, match="SandboxBudget.runs"):
        SandboxBudget(runs=-1)
    with pytest.raises(ValueError, match="SandboxBudget.seconds"):
        SandboxBudget(seconds=0)


def test_budget_meter_counts_runs_and_seconds():
    meter = SandboxBudget(runs=3, seconds=1.0).meter()
    assert meter.refusal() is None and meter.timeout(10.0) == 1.0
    meter.charge(ExecResult("", "", 0, duration=0.75))
    assert meter.timeout(10.0) == pytest.approx(0.25) and meter.timeout(0.1) == 0.1
    meter.charge(ExecResult("", "", 0, duration=0.5))
    assert meter.refusal() == "no sandbox time left (1 s used)"
    runs_only = SandboxBudget(runs=1).meter()
    runs_only.charge(ExecResult("", "", 0, duration=5.0))
    assert runs_only.refusal() == "no runs left (1 used)" and runs_only.usage() == {"sandbox_runs": 1, "sandbox_seconds": 5.0}


def test_latency_stats_percentiles_and_reservoir():
    stats = LatencyStats(keep=100)
    for ms in range(1, 1001):
        stats.record(ms / 1000)
    summary = stats.summary("x")
    assert summary["x_count"] == 1000 and summary["x_max_ms"] == 1000.0
    assert 300 < summary["x_p50_ms"] < 700  # a uniform sample of 1..1000 ms
