"""ThroughputModel: an engine that paces another one like a GPU server, for tests and benches.

A GPU server runs a fixed number of sequences at once; each decode step emits one token for every
running sequence and takes longer the larger the batch; a new sequence first pays for its prompt
(prefill); a weight update pauses admission for a while and then serves a new version, while
sequences already running continue under it. The wrapped engine (usually ``ScriptedEngine``) decides
*which* tokens come out, so outputs stay deterministic; this class decides *when*. One ticker task
steps the whole batch (not one timer per sequence), so thousands of sequences stay cheap.

Sequences that cross an update report per-token ``version_spans``; ``abort(rid)`` ends a sequence
with the tokens emitted so far (SGLang's partial-output semantics).

Utilisation is read on the model's own clock, not the wall clock, so a server process starved of
CPU on a shared machine is not mistaken for a server its client fails to keep fed: ``model_s`` is
the modelled step times plus the real time spent with nothing to decode, ``busy_s`` the modelled
step times, and ``slot_s`` the slot-seconds decoding (running sequences × step time, summed).
Busy fraction over a window = Δ``slot_s`` / (``slots`` × Δ``model_s``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from miles_envs.engine import Engine, Generation, SamplingParams
from miles_envs.weight_sync import WeightSource, accept, accepted_kinds


@dataclass
class _Sequence:
    full: Generation
    prompt_len: int
    routed_start: int
    done: asyncio.Future[Generation]
    prefill_s: float
    spans: list[tuple[int, str]] = field(default_factory=list)
    emitted: int = 0


class ThroughputModel:
    """``Engine`` pacing ``inner``: ``slots`` concurrent sequences, batch-dependent decode, prefill, update pauses."""

    def __init__(
        self,
        inner: Engine,
        *,
        slots: int = 64,
        decode_s: float = 0.01,
        decode_s_per_running: float = 1e-4,
        prefill_s_per_token: float = 2e-6,
        update_pause_s: float = 0.5,
        weight_version: str = "0",
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.inner = inner
        self.slots = slots
        self.decode_s = decode_s
        self.decode_s_per_running = decode_s_per_running
        self.prefill_s_per_token = prefill_s_per_token
        self.update_pause_s = update_pause_s
        self.weight_version = weight_version
        self._running: dict[str, _Sequence] = {}
        self._joining: list[_Sequence] = []
        self._free: asyncio.Semaphore | None = None
        self._admitting: asyncio.Event | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.busy_s = 0.0  # modelled time with at least one sequence running
        self.slot_s = 0.0  # Σ running sequences × step time
        self.steps = 0
        self._clock_s = 0.0  # the model clock up to the last idle period's start
        self._idle_since: float | None = time.monotonic()

    @property
    def model_s(self) -> float:
        """The model's clock: modelled step times plus real time with nothing to decode."""
        idle = 0.0 if self._idle_since is None else time.monotonic() - self._idle_since
        return self._clock_s + idle

    async def capacity(self) -> int:
        return self.slots

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
        free, admitting = self._primitives()
        await admitting.wait()
        async with free:
            full = await self.inner.generate(
                input_ids, sampling, return_routed_experts=return_routed_experts,
                routed_experts_start=routed_experts_start, lora=lora, rid=rid,
            )
            if not full.output_ids:
                return full
            sequence = _Sequence(
                full, len(input_ids), routed_experts_start, asyncio.get_running_loop().create_future(),
                prefill_s=len(input_ids) * self.prefill_s_per_token, spans=[(0, self.weight_version)],
            )
            key = rid if rid is not None else str(id(sequence))
            self._running[key] = sequence
            self._joining.append(sequence)
            if self._ticker is None or self._ticker.done():
                self._ticker = asyncio.ensure_future(self._tick())
            try:
                return await sequence.done
            finally:
                self._running.pop(key, None)

    async def _tick(self) -> None:
        """One decode step at a time for the whole batch; joining sequences add their prefill to the step."""
        self._clock_s, self._idle_since = self.model_s, None
        try:
            while self._decoding():
                await self._step()
        finally:
            self._idle_since = time.monotonic()

    def _decoding(self) -> int:
        """Sequences still emitting (a finished one leaves ``_running`` only when its caller resumes)."""
        return sum(not s.done.done() for s in self._running.values())

    async def _step(self) -> None:
        joining, self._joining = self._joining, []
        running = self._decoding()
        step = self.decode_s + self.decode_s_per_running * running + sum(s.prefill_s for s in joining)
        await asyncio.sleep(step)
        self.busy_s += step
        self.slot_s += running * step
        self._clock_s += step
        self.steps += 1
        for sequence in list(self._running.values()):
            if sequence.done.done():
                continue
            if sequence.spans[-1][1] != self.weight_version:
                sequence.spans.append((sequence.emitted, self.weight_version))
            sequence.emitted += 1
            if sequence.emitted == len(sequence.full.output_ids):
                sequence.done.set_result(self._result(sequence, sequence.full.finish_reason))

    def _result(self, sequence: _Sequence, finish: str, error: str | None = None) -> Generation:
        full, n = sequence.full, sequence.emitted
        routed = full.routed_experts
        if routed is not None and n < len(full.output_ids):
            rows = sequence.prompt_len - sequence.routed_start + n - 1
            routed = routed[:rows] if n else None
        spans = sequence.spans if len(sequence.spans) > 1 else []
        return Generation(
            output_ids=full.output_ids[:n], logprobs=full.logprobs[:n], finish_reason=finish,  # type: ignore[arg-type]
            routed_experts=routed, weight_version=self.weight_version, version_spans=spans,
            prompt_tokens=full.prompt_tokens, cached_tokens=full.cached_tokens,
            spec=full.spec if n == len(full.output_ids) else None,
            matched_stop=full.matched_stop if finish == "stop" else None, error=error,
        )

    async def abort(self, rid: str | None = None) -> None:
        """End running sequences now, keeping the tokens they emitted."""
        targets = list(self._running.values()) if rid is None else [self._running[rid]] if rid in self._running else []
        for sequence in targets:
            if not sequence.done.done():
                sequence.done.set_result(self._result(sequence, "abort", "Aborted by /abort_request"))
        await self.inner.abort(rid)

    @property
    def weight_sources(self) -> frozenset[str]:
        return accepted_kinds(self.inner)

    async def update_weights(self, source: WeightSource | Any, *, version: str | None = None) -> None:
        """Pause admission for ``update_pause_s``, then serve the new version (running sequences continue)."""
        accept(source, self.weight_sources, type(self.inner).__name__)
        _, admitting = self._primitives()
        admitting.clear()
        try:
            await asyncio.sleep(self.update_pause_s)
            await self.inner.update_weights(source, version=version)
            self.weight_version = version if version is not None else str(source)
        finally:
            admitting.set()

    async def health(self) -> bool:
        return await self.inner.health()

    async def close(self) -> None:
        await self.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        await self.inner.close()

    def _primitives(self) -> tuple[asyncio.Semaphore, asyncio.Event]:
        """Created on first use, inside the serving event loop."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
            self._admitting = asyncio.Event()
            self._admitting.set()
        return self._free, self._admitting  # type: ignore[return-value]

