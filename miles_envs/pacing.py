"""Admission of client CPU work by event-loop lag, so one process can hold many thousands of episodes.

Every turn costs the client CPU (parsing, the env step, rendering the observation). With thousands
of episodes, turns whose generations return together run back to back and the event loop stalls
for seconds: timers fire late, health checks and progress freeze, request timeouts trip.
``LagWindow`` bounds how many episodes may be doing client work at once, and sizes that bound by
additive-increase / multiplicative-decrease on the measured loop lag, like TCP's congestion window:
the window grows while the loop keeps up and halves when it falls behind. It is never held across
a generation request: a slot held while the server works would starve the server (the requests
in flight are bounded by the server's capacity instead, see ``miles_envs.session``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LagWindow:
    def __init__(self, target_lag_s: float = 0.02, initial: int = 32, minimum: int = 1, tick_s: float = 0.005) -> None:
        self.target_lag_s, self.minimum, self.tick_s = target_lag_s, minimum, tick_s
        self.window = max(initial, minimum)
        self.in_flight = 0
        self.max_lag_s = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._monitor: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagWindow:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_lag())
        if self.in_flight >= self.window or self._waiters:
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
            self.in_flight += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.in_flight < self.window:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    async def _watch_lag(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            lag = time.perf_counter() - started - self.tick_s
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > self.target_lag_s:
                self.window = max(self.minimum, self.window // 2)
            elif lag < self.target_lag_s / 2 and self.in_flight >= self.window:
                self.window += max(1, self.window // 8)
                self._admit()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
