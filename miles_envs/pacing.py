"""Pacing of a rollout's client CPU work by event-loop lag, so one process can hold many thousands of episodes.

Every turn costs the client CPU (parsing, the env step, rendering the observation). With thousands
of episodes, turns whose generations return together run back to back and the event loop stalls
for seconds: timers fire late, health checks and progress freeze, request timeouts trip.
``LagWindow`` bounds how many episodes may be doing client work at once and how many may start it
in one event-loop pass (a turn on an inline env never suspends, so a bound on concurrency alone
would let a whole burst of turns run back to back in one pass), and sizes that bound by
additive-increase / multiplicative-decrease on the measured loop lag, like TCP's congestion window:
the window grows while the loop keeps up and halves when it falls behind. It is never held across
a generation request: a slot held while the server works would starve the server (the requests
in flight are bounded by the server's capacity instead, see ``miles_envs.session``).
``QuietCollector`` keeps the garbage collector's long passes out of the same loop.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque


class LagWindow:
    def __init__(self, target_lag_s: float = 0.02, initial: int = 32, minimum: int = 1, tick_s: float = 0.005) -> None:
        self.target_lag_s, self.minimum, self.tick_s = target_lag_s, minimum, tick_s
        self.window = max(initial, minimum)
        self.in_flight = 0
        self.entered_this_pass = 0
        self.max_lag_s = 0.0
        self._pass_scheduled = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._monitor: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagWindow:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_lag())
        if self.in_flight >= self.window or self._waiters or self.entered_this_pass >= self.window:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._admit()  # it was admitted just before the cancel: pass the slot on
                raise
        else:
            self._enter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        self._admit()

    def _enter(self) -> None:
        self.in_flight += 1
        self.entered_this_pass += 1
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._pass_scheduled = False
        self.entered_this_pass = 0
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.in_flight < self.window and self.entered_this_pass < self.window:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._enter()
                waiter.set_result(None)

    async def _watch_lag(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            lag = time.perf_counter() - started - self.tick_s
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > self.target_lag_s:
                self.window = max(self.minimum, self.window // 2)
            elif lag < self.target_lag_s / 2 and self._waiters:
                self.window += max(1, self.window // 8)
                self._admit()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None


class QuietCollector:
    """Keeps the cyclic garbage collector's long passes out of a rollout's event loop.

    Thousands of live episodes are hundreds of thousands of tracked objects (token lists, messages,
    tasks, coroutines). CPython's default thresholds (700, 10, 10) then run a full collection every
    time the live heap grows by a quarter: each one walks the whole heap (the tokenizer, templates and
    modules included) and stalls the loop for 0.1–0.9 s, and young collections take a third of the
    client's CPU (measured in ``bench/loop_overhead.py``). While a rollout runs, the heap that existed
    before it is frozen out of every pass (``gc.freeze``), young collections run an order of magnitude less often,
    and middle and full ones become rare (episodes make almost no cyclic garbage: it dies in young
    collections); a middle pass walks every live episode's token lists, 0.2–0.4 s at 10⁴ episodes.
    Process-wide and reentrant: the last rollout to leave restores the thresholds and unfreezes.
    """

    def __init__(self, young: int = 10_000, middle: int = 100, full: int = 100) -> None:
        self.thresholds = (young, middle, full)
        self._depth = 0
        self._saved: tuple[int, int, int] | None = None
        self._unfreeze = False

    def __enter__(self) -> QuietCollector:
        if self._depth == 0 and gc.isenabled():
            self._unfreeze = gc.get_freeze_count() == 0  # a heap frozen by the program itself stays frozen
            gc.freeze()  # no collection first: it would cost every short rollout a full pass; garbage
            # frozen now is collected after the last exit unfreezes it
            self._saved = gc.get_threshold()
            gc.set_threshold(*self.thresholds)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._saved is not None:
            gc.set_threshold(*self._saved)
            if self._unfreeze:
                gc.unfreeze()
            self._saved = None


quiet_collector = QuietCollector()
