"""The rollout session: one engine shared by many episodes while its weights change under them.

A ``RolloutSession`` wraps an engine and is itself an engine (the loop drives it like any other),
adding what a real RL schedule needs:

- **Weight updates mid-rollout.** ``update_weights`` may be called while turns are generating.
  The policy (``SessionConfig.update_policy``) says what happens to generations in flight:

  - ``continue`` (default): nothing is interrupted; generations in flight finish, and every token
    carries the version the engine reports for it (a generation that crosses the update is split
    into version spans). The next turn runs under the new weights.
  - ``abort_and_resume``: new requests are held, in-flight ones are aborted on the engine
    (``engine.abort(rid)``), the update is applied, and each aborted turn is resubmitted from the
    episode's kept token stream under the new weights. ``keep_partial`` (default True) keeps the
    tokens sampled before the abort, tagged with the old version (SGLang's partial rollouts), and
    resubmits after them; ``keep_partial=False`` drops them and regenerates the whole turn.
  - ``drain``: new requests are held until every generation in flight has finished, then the
    update is applied. ``drain_timeout_s`` bounds the wait; past it the update is applied anyway
    and the stragglers' tokens are split by version like under ``continue`` (counted in
    ``stats.drain_timeouts``).

  No policy loses an episode: an abort the session asked for is never reported to the loop.
- **Admission by server capacity.** At most ``max_running`` generation requests are in flight;
  by default the engine's ``capacity()`` (e.g. SGLang's ``max_running_requests``) plus
  ``queue_headroom`` (25%): the few requests waiting in the server's own queue refill a finished
  sequence's slot at once instead of after the client's turnaround (env step, rendering, HTTP), so
  the server's batch stays full. Unbounded when the engine reports no capacity. The slot is held
  exactly across the engine call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from miles_envs.engine import Generation, SamplingParams, SpecStats
from miles_envs.weight_sync import WeightSource, accept, accepted_kinds

UPDATE_POLICIES = ("continue", "abort_and_resume", "drain")


class UpdateNotSupported(TypeError):
    """The engine cannot take weight updates (or aborts, for ``abort_and_resume``)."""


@dataclass
class SessionConfig:
    update_policy: str = "continue"
    keep_partial: bool = True  # abort_and_resume: keep tokens sampled before the abort (old version)
    drain_timeout_s: float = 600.0  # drain / abort_and_resume: longest wait for in-flight generations
    max_running: int | None = None  # generation requests in flight; None: from the engine's capacity()
    queue_headroom: float = 0.25  # requests beyond the reported capacity, queued at the server

    def __post_init__(self) -> None:
        if self.update_policy not in UPDATE_POLICIES:
            raise ValueError(f"unknown update policy {self.update_policy!r}: choose from {', '.join(UPDATE_POLICIES)}")
        if not self.drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s}: must be positive")
        if self.queue_headroom < 0:
            raise ValueError(f"queue_headroom={self.queue_headroom}: must be 0 or more")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running={self.max_running}: must be at least 1 (or None for the engine's capacity)")


@dataclass
class SessionStats:
    updates: int = 0
    aborted_generations: int = 0  # in-flight generations aborted by abort_and_resume
    resubmissions: int = 0
    kept_partial_tokens: int = 0  # sampled before an abort and kept (old version)
    dropped_tokens: int = 0  # sampled before an abort and thrown away (keep_partial=False)
    drain_timeouts: int = 0
    peak_running: int = 0
    update_wait_s: list[float] = field(default_factory=list)  # per update: how long new requests were held


class RolloutSession:
    """An engine wrapper applying the update policy and capacity admission; see the module docstring."""

    def __init__(self, engine: Any, config: SessionConfig | None = None) -> None:
        self.engine = engine
        self.config = config or SessionConfig()
        if self.config.update_policy == "abort_and_resume" and not callable(getattr(engine, "abort", None)):
            raise UpdateNotSupported(
                f"{type(engine).__name__} cannot abort requests, which update policy abort_and_resume needs: "
                "use continue or drain"
            )
        self.stats = SessionStats()
        self._rid_prefix, self._rids = uuid.uuid4().hex, itertools.count()  # unique request ids without a uuid each
        self._running: set[str] = set()
        self._aborted_by_update: set[str] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._update_lock = asyncio.Lock()
        self._capacity_lock = asyncio.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._capacity_known = False
        self.max_running: int | None = None

    # -- the engine protocol ------------------------------------------------------------------
    async def generate(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        *,
        return_routed_experts: bool = False,
        routed_experts_start: int = 0,
        lora: str | None = None,
        rid: str | None = None,
    ) -> Generation:
        """One turn; resubmitted from the kept stream whenever an update aborts it."""
        pieces: list[Generation] = []
        kept: list[int] = []
        start = routed_experts_start
        while True:
            request_rid = rid if rid is not None and not pieces else f"{self._rid_prefix}-{next(self._rids)}"
            gen = await self._submit(
                [*input_ids, *kept] if kept else input_ids,
                replace(sampling, max_new_tokens=sampling.max_new_tokens - len(kept)) if kept else sampling,
                return_routed_experts=return_routed_experts, routed_experts_start=start, lora=lora, rid=request_rid,
            )
            aborted_by_update = self._take_update_abort(request_rid)
            if not (gen.finish_reason == "abort" and aborted_by_update):
                return merge_generations([*pieces, gen]) if pieces else gen
            self.stats.aborted_generations += 1
            if self.config.keep_partial and gen.output_ids:
                pieces.append(gen)
                kept.extend(gen.output_ids)
                start += 0 if gen.routed_experts is None else len(gen.routed_experts)
                self.stats.kept_partial_tokens += len(gen.output_ids)
                if len(kept) >= sampling.max_new_tokens:
                    return replace(merge_generations(pieces), finish_reason="length", error=None)
            else:
                self.stats.dropped_tokens += len(gen.output_ids)
            self.stats.resubmissions += 1

    @property
    def weight_sources(self) -> frozenset[str]:
        return accepted_kinds(self.engine)

    async def update_weights(self, source: WeightSource | Any, *, version: str | None = None) -> None:
        """Apply an update under the session's policy (safe to call while episodes run).

        A source the engine cannot take is refused before any request is paused or aborted.
        """
        update = getattr(self.engine, "update_weights", None)
        if not callable(update):
            raise UpdateNotSupported(f"{type(self.engine).__name__} cannot update its weights (it has no update_weights)")
        accept(source, self.weight_sources, type(self.engine).__name__)
        loop = asyncio.get_running_loop()
        async with self._update_lock:
            policy = self.config.update_policy
            held = loop.time()
            if policy != "continue":
                self._open.clear()
            try:
                if policy == "abort_and_resume":
                    await self._abort_running()
                if policy != "continue":
                    await self._wait_idle()
                await update(source, version=version)
            finally:
                self._open.set()
            self.stats.updates += 1
            self.stats.update_wait_s.append(loop.time() - held if policy != "continue" else 0.0)

    async def abort(self, rid: str | None = None) -> None:
        """An abort from outside the session: the loop sees it (the episode ends ``aborted``)."""
        await self.engine.abort(rid)

    async def capacity(self) -> int | None:
        await self._ensure_slots()
        return self.max_running

    async def health(self) -> bool:
        return await self.engine.health()

    async def close(self) -> None:
        await self.engine.close()

    def __getattr__(self, name: str) -> Any:
        """Everything else (tokenizer, weight_version, LoRA admin, ...) is the wrapped engine's."""
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    # -- inside -------------------------------------------------------------------------------
    @property
    def in_flight(self) -> list[str]:
        """Request ids of the generations now running on the engine."""
        return list(self._running)

    async def _submit(self, input_ids: list[int], sampling: SamplingParams, *, rid: str, **options: Any) -> Generation:
        if not self._capacity_known:
            await self._ensure_slots()
        async with self._slots if self._slots is not None else contextlib.nullcontext():
            if not self._open.is_set():  # checked with the slot in hand: nothing starts while an update is held
                await self._open.wait()
            self._running.add(rid)
            self._idle.clear()
            self.stats.peak_running = max(self.stats.peak_running, len(self._running))
            try:
                return await self.engine.generate(input_ids, sampling, rid=rid, **options)
            finally:
                self._running.discard(rid)
                if not self._running:
                    self._idle.set()

    async def _ensure_slots(self) -> None:
        if self._capacity_known:
            return
        async with self._capacity_lock:
            if self._capacity_known:
                return
            limit = self.config.max_running
            reported = getattr(self.engine, "capacity", None)
            if limit is None and callable(reported) and (capacity := await reported()) is not None:
                limit = math.ceil(capacity * (1 + self.config.queue_headroom))
            if limit is not None:
                self._slots = asyncio.Semaphore(int(limit))
            self.max_running = limit
            self._capacity_known = True

    def _take_update_abort(self, rid: str) -> bool:
        if rid in self._aborted_by_update:
            self._aborted_by_update.discard(rid)
            return True
        return False

    async def _abort_running(self) -> None:
        running = list(self._running)
        self._aborted_by_update.update(running)
        await asyncio.gather(*(self.engine.abort(rid) for rid in running))

    async def _wait_idle(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except asyncio.TimeoutError:
            self.stats.drain_timeouts += 1


def as_session(engine: Any, config: SessionConfig | None = None) -> RolloutSession:
    """``engine`` itself if it is already a session, else a new session around it."""
    return engine if isinstance(engine, RolloutSession) else RolloutSession(engine, config)


def merge_generations(pieces: list[Generation]) -> Generation:
    """One turn's generations (partial outputs then the resubmission) as one ``Generation``."""
    if len(pieces) == 1:
        return pieces[0]
    last = pieces[-1]
    spans: list[tuple[int, str]] = []
    offset = 0
    for piece in pieces:
        if not piece.output_ids:
            continue
        for index, version in piece.spans():
            if not spans or spans[-1][1] != version:
                spans.append((offset + index, version))
        offset += len(piece.output_ids)
    routing = [p.routed_experts for p in pieces if p.routed_experts is not None and len(p.routed_experts)]
    specs = [p.spec for p in pieces if p.spec is not None]
    return replace(
        last,
        output_ids=[t for p in pieces for t in p.output_ids],
        logprobs=[lp for p in pieces for lp in p.logprobs],
        routed_experts=np.concatenate(routing) if routing else None,
        version_spans=spans if len(spans) > 1 else [],
        weight_version=spans[-1][1] if spans else last.weight_version,
        prompt_tokens=pieces[0].prompt_tokens,
        spec=sum(specs, SpecStats()) if specs else None,
    )
