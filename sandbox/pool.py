"""A bounded pool of warm sandboxes shared by many concurrent episodes.

Starting a sandbox costs a namespace or a container; running code in a warm one costs a fork. The
pool keeps up to ``size`` started sandboxes, hands them out one caller at a time, resets them
between uses, checks the health of ones that sat idle, and replaces them after ``ttl_s`` seconds or
``max_uses`` uses. Callers beyond ``size`` wait their turn, so thousands of episodes can share it.
Starts go through a :class:`StartGate` (at most ``max_starting`` at once, each within
``start_budget_s``); ``metrics()`` shows the queue depth and the waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from miles_envs.sandbox.admission import LatencyStats, QueuedSlots, StartGate
from miles_envs.sandbox.base import ExecResult, Sandbox, SandboxError, SandboxSession
from miles_envs.sandbox.factory import make_sandbox


@dataclass
class _Warm:
    sandbox: Sandbox
    created: float = field(default_factory=time.monotonic)
    checked: float = field(default_factory=time.monotonic)
    uses: int = 0


@dataclass
class PoolStats:
    created: int = 0
    reused: int = 0
    discarded: int = 0


class SandboxPool:
    """Warm sandboxes of one backend. ``backend`` is a name for :func:`make_sandbox` (extra keyword
    arguments go to it) or a zero-argument factory returning a sandbox. ``gate`` shares one start
    admission between pools; without it the pool has its own (``max_starting``, ``start_budget_s``).
    ``wait_budget_s`` bounds how long a caller waits for a free sandbox (None: as long as it takes).
    """

    def __init__(
        self,
        backend: str | Callable[[], Sandbox] = "local",
        *,
        size: int = 8,
        ttl_s: float = 600.0,
        max_uses: int = 10_000,
        health_check_s: float = 30.0,
        max_starting: int = 4,
        start_budget_s: float = 60.0,
        wait_budget_s: float | None = None,
        gate: StartGate | None = None,
        **sandbox_kwargs: Any,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, got {size}")
        if callable(backend):
            if sandbox_kwargs:
                raise TypeError("sandbox options go to the factory itself when backend is a factory")
            self._factory = backend
        else:
            self._factory = lambda: make_sandbox(backend, **sandbox_kwargs)
        self.size = size
        self.ttl_s = ttl_s
        self.max_uses = max_uses
        self.health_check_s = health_check_s
        self.stats = PoolStats()
        self.gate = gate or StartGate(max_starting, start_budget_s)
        self.wait_budget_s = wait_budget_s
        self.wait_timeouts = 0
        self.wait = LatencyStats()
        self._idle: list[_Warm] = []
        self._slots = QueuedSlots(size)
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def start(self, warm: int | None = None) -> None:
        """Start ``warm`` sandboxes now (default: the pool size) so first callers find them ready."""
        count = min(self.size, self.size if warm is None else warm) - len(self._idle)
        fresh = await asyncio.gather(*(self._create() for _ in range(max(count, 0))))
        self._idle.extend(fresh)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Sandbox]:
        """Exclusive use of one warm sandbox; it is reset when the block exits."""
        async with self._lease() as warm:
            yield warm.sandbox
            await warm.sandbox.reset()

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        """``Sandbox.run`` on a pooled sandbox (a stateless run leaves it clean, so no reset)."""
        async with self._lease() as warm:
            return await warm.sandbox.run(code, **kwargs)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[SandboxSession]:
        """A stateful session on a pooled sandbox, reset when the block exits."""
        async with self._lease() as warm, warm.sandbox.session() as session:
            yield session

    def metrics(self) -> dict[str, Any]:
        """Queue depth and waits of callers (``wait_*``: request to holding a sandbox, its start
        included), the start gate's figures (``start_*``), and the pool's counters."""
        return {
            "size": self.size,
            "idle": self.idle,
            "queue_depth": self._slots.waiting,
            "queue_depth_max": self._slots.waiting_max,
            **self.wait.summary("wait"),
            "wait_timeouts": self.wait_timeouts,
            **self.gate.metrics(),
            "created": self.stats.created,
            "reused": self.stats.reused,
            "discarded": self.stats.discarded,
        }

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.sandbox.close() for w in idle))

    async def __aenter__(self) -> SandboxPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------------
    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[_Warm]:
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        requested = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_budget_s)
        except asyncio.TimeoutError:
            self.wait_timeouts += 1
            raise SandboxError(
                f"no sandbox free within wait_budget_s={self.wait_budget_s:g} s (pool size {self.size}, "
                f"{self._slots.waiting} callers waiting); raise size or wait_budget_s, or run fewer episodes at once"
            ) from None
        try:
            warm = await self._take()
            self.wait.record(time.monotonic() - requested)
            try:
                yield warm
            finally:
                warm.uses += 1
                await self._give_back(warm)
        finally:
            self._slots.release()

    async def _take(self) -> _Warm:
        while self._idle:
            warm = self._idle.pop()
            if self._expired(warm):
                await self._discard(warm)
                continue
            if time.monotonic() - warm.checked > self.health_check_s:
                if not await warm.sandbox.healthy():
                    await self._discard(warm)
                    continue
                warm.checked = time.monotonic()
            self.stats.reused += 1
            return warm
        return await self._create()

    async def _give_back(self, warm: _Warm) -> None:
        alive = getattr(warm.sandbox, "started", True)
        if self._closed or not alive or self._expired(warm):
            await self._discard(warm)
        else:
            self._idle.append(warm)

    def _expired(self, warm: _Warm) -> bool:
        return warm.uses >= self.max_uses or time.monotonic() - warm.created > self.ttl_s

    async def _create(self) -> _Warm:
        sandbox = self._factory()
        await self.gate.start(sandbox)
        self.stats.created += 1
        return _Warm(sandbox)

    async def _discard(self, warm: _Warm) -> None:
        self.stats.discarded += 1
        await warm.sandbox.close()
