"""Start admission: a cap on sandboxes *starting* at once, a wall-clock budget per start, and the
waiting made visible.

Starting a sandbox (a namespace, a container) is the expensive, failure-prone step under load:
hundreds of simultaneous starts make every one of them slow, and start timeouts follow. The gate
lets ``max_starting`` starts run at a time and queues the rest; a start that does not finish
within ``start_budget_s`` is torn down and reported as a start failure. It is separate from any
pool size: a pool of 512 warm sandboxes still fills at ``max_starting`` per step.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from miles_envs.sandbox.base import Sandbox, SandboxError


class LatencyStats:
    """Durations in seconds: count, max and percentiles over a bounded uniform reservoir."""

    def __init__(self, keep: int = 20_000, seed: int = 0) -> None:
        self.keep = keep
        self.count = 0
        self.max = 0.0
        self._samples: list[float] = []
        self._random = random.Random(seed)

    def record(self, seconds: float) -> None:
        self.count += 1
        self.max = max(self.max, seconds)
        if len(self._samples) < self.keep:
            self._samples.append(seconds)
        else:
            slot = self._random.randrange(self.count)
            if slot < self.keep:
                self._samples[slot] = seconds

    def percentile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_count": self.count,
            f"{prefix}_p50_ms": self.percentile(0.5) * 1e3,
            f"{prefix}_p99_ms": self.percentile(0.99) * 1e3,
            f"{prefix}_max_ms": self.max * 1e3,
        }


class QueuedSlots:
    """A semaphore that counts the callers waiting for it (the queue depth) and its peak."""

    def __init__(self, slots: int) -> None:
        self._semaphore = asyncio.Semaphore(slots)
        self.waiting = 0
        self.waiting_max = 0

    async def acquire(self) -> None:
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return
        self.waiting += 1
        self.waiting_max = max(self.waiting_max, self.waiting)
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._semaphore.release()


class StartGate:
    """Lets at most ``max_starting`` sandboxes start at once, each within ``start_budget_s``."""

    def __init__(self, max_starting: int = 4, start_budget_s: float = 60.0) -> None:
        if max_starting < 1:
            raise ValueError(f"max_starting must be at least 1, got {max_starting}")
        if start_budget_s <= 0:
            raise ValueError(f"start_budget_s must be positive, got {start_budget_s}")
        self.max_starting = max_starting
        self.start_budget_s = start_budget_s
        self.starting = 0
        self.starting_max = 0
        self.failures = 0
        self.wait = LatencyStats()
        self.start_time = LatencyStats()
        self._slots = QueuedSlots(max_starting)

    async def start(self, sandbox: Sandbox) -> None:
        """Start ``sandbox`` once a slot is free; on failure or an overrun budget it is closed and
        a SandboxError says why."""
        queued = time.monotonic()
        await self._slots.acquire()
        try:
            self.wait.record(time.monotonic() - queued)
            self.starting += 1
            self.starting_max = max(self.starting_max, self.starting)
            began = time.monotonic()
            try:
                await asyncio.wait_for(sandbox.start(), self.start_budget_s)
            except BaseException as error:
                self.failures += 1
                await asyncio.shield(sandbox.close())
                if isinstance(error, asyncio.TimeoutError):
                    raise SandboxError(
                        f"{sandbox.backend} sandbox did not start within start_budget_s={self.start_budget_s:g} s; "
                        "raise start_budget_s, or lower max_starting if the machine is overloaded"
                    ) from error
                raise
            finally:
                self.starting -= 1
            self.start_time.record(time.monotonic() - began)
        finally:
            self._slots.release()

    def metrics(self) -> dict[str, Any]:
        return {
            "max_starting": self.max_starting,
            "starting": self.starting,
            "starting_max": self.starting_max,
            "start_queue_depth": self._slots.waiting,
            "start_queue_depth_max": self._slots.waiting_max,
            "start_failures": self.failures,
            **self.wait.summary("start_wait"),
            **self.start_time.summary("start"),
        }
