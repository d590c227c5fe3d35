import asyncio
import gc
import time
from collections import Counter

from miles_envs.pacing import LagWindow, QuietCollector


async def test_in_flight_never_exceeds_the_window_and_all_finish():
    window = LagWindow(target_lag_s=10.0, initial=3)
    over, done = 0, 0

    async def turn():
        nonlocal over, done
        async with window:
            over += window.in_flight > window.window
            await asyncio.sleep(0.001)
            done += 1

    await asyncio.gather(*(turn() for _ in range(50)))
    window.close()
    assert over == 0 and done == 50 and window.in_flight == 0


async def test_a_stalled_loop_halves_the_window():
    window = LagWindow(target_lag_s=0.01, initial=64, tick_s=0.001)
    async with window:
        await asyncio.sleep(0.005)  # let the lag watcher start
        time.sleep(0.1)  # a CPU-bound stretch: the loop falls 100 ms behind
        await asyncio.sleep(0.005)
    window.close()
    assert window.window <= 32 and window.max_lag_s >= 0.05


async def test_the_window_grows_while_the_loop_keeps_up_under_demand():
    window = LagWindow(target_lag_s=1.0, initial=2, tick_s=0.001)

    async def turn():
        async with window:
            await asyncio.sleep(0.02)

    await asyncio.gather(*(turn() for _ in range(200)))
    window.close()
    assert window.window > 2


async def test_cancelled_waiters_give_their_slot_back():
    window = LagWindow(target_lag_s=10.0, initial=1)
    release = asyncio.Event()

    async def holder():
        async with window:
            await release.wait()

    async def waiter():
        async with window:
            pass

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    blocked = [asyncio.create_task(waiter()) for _ in range(3)]
    await asyncio.sleep(0)
    blocked[0].cancel()
    release.set()
    await first
    await asyncio.gather(*blocked[1:])
    window.close()
    assert window.in_flight == 0


async def test_turns_that_never_suspend_enter_at_most_a_window_per_loop_pass():
    window = LagWindow(target_lag_s=10.0, initial=4)
    passes, entered_at = 0, []
    finished = False

    async def count_passes():
        nonlocal passes
        while not finished:
            passes += 1
            await asyncio.sleep(0)

    async def turn():
        async with window:  # CPU work only: nothing inside awaits
            entered_at.append(passes)

    counter = asyncio.create_task(count_passes())
    await asyncio.gather(*(turn() for _ in range(40)))
    finished = True
    await counter
    window.close()
    per_pass = Counter(entered_at)
    assert len(entered_at) == 40 and max(per_pass.values()) <= 4 and len(per_pass) >= 10


def test_quiet_collector_freezes_and_restores_once_the_last_user_leaves():
    before = gc.get_threshold()
    collector = QuietCollector(young=5000, middle=7, full=50)
    with collector:
        assert gc.get_threshold() == (5000, 7, 50) and gc.get_freeze_count() > 0
        with collector:
            pass
        assert gc.get_threshold() == (5000, 7, 50)  # the inner user leaving changes nothing
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_quiet_collector_leaves_a_heap_the_program_froze_frozen():
    gc.freeze()
    try:
        with QuietCollector():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
