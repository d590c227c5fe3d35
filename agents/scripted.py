"""ScriptedEngine: deterministic replies with real token ids, for tests and loop benchmarks.

Replies come from a list (the n-th call gets ``replies[n % len]``) or a callable given a
``ScriptContext``. Text is encoded with the real tokenizer (cached per distinct reply) and ends with
the tokenizer's end-of-turn id unless the reply says otherwise. Finishing follows SGLang's order:
the length limit is checked before stop tokens and stop strings, so a stop that lands exactly on
``max_new_tokens`` still reports ``length``. Logprobs and routing are synthetic but a pure function of
(token id, position), so a multi-turn episode gets the same rows whether asked for at once or in
increments.

Live weight updates: with ``token_delay_s > 0`` a generation emits one token per delay, so
``update_weights`` may land mid-generation; each token is tagged with the version current when it
was sampled (``Generation.version_spans``), and ``abort(rid)`` ends a request early with the tokens
sampled so far (``finish_reason="abort"``, SGLang's semantics). A request resubmitted from the
aborted one's stream (its input plus the kept partial output, or its input alone) continues the
same reply, as a model sampling deterministically would.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from miles_envs.engine import Generation, SamplingParams, SpecStats
from miles_envs.weight_sync import ALL_KINDS, WeightSource, weight_source


@dataclass(frozen=True)
class ScriptedReply:
    text: str
    stop_on_eos: bool = True


@dataclass(frozen=True)
class ScriptContext:
    """What a reply callable may look at to choose the reply."""

    input_ids: list[int]
    call_index: int
    sampling: SamplingParams
    rid: str | None = None
    lora: str | None = None
    weight_version: str | None = None


_CACHE_LIMIT = 65536

ReplyFn = Callable[[ScriptContext], "str | ScriptedReply"]


@dataclass(frozen=True)
class SyntheticRouting:
    """Deterministic MoE routing: ``topk`` distinct experts per token and MoE layer.

    Layers listed in ``dense_layers`` have no router; like SGLang's capturer they come back as zeros.
    """

    num_layers: int
    topk: int
    num_experts: int
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be between 1 and num_experts={self.num_experts}")

    def rows(self, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``[len(token_ids), num_layers, topk]`` int32 for tokens at the given absolute positions."""
        layers = np.arange(self.num_layers, dtype=np.int64)
        base = (token_ids[:, None] * 7919 + positions[:, None] * 104729 + layers[None, :] * 1299709) % self.num_experts
        offsets = np.arange(self.topk, dtype=np.int64)
        experts = (base[:, :, None] + offsets[None, None, :]) % self.num_experts
        if self.dense_layers:
            experts[:, list(self.dense_layers), :] = 0
        return experts.astype(np.int32)


def synthetic_logprob(token_id: int, position: int) -> float:
    """A deterministic log-probability in [-2.0, -0.001]."""
    return -((token_id * 31 + position * 17) % 2000 + 1) / 1000.0


@dataclass
class _Encoded:
    ids: list[int]
    stop_on_eos: bool
    # stop-string → number of leading tokens whose decoding first contains it (None: never)
    stop_cut: dict[str, int | None] = field(default_factory=dict)


@dataclass
class _Request:
    sampled: int = 0
    abort_requested: bool = False


@dataclass(eq=False)
class _Partial:
    """An aborted scripted reply: ``ids[:cut]`` were sampled before the abort."""

    input_ids: list[int]
    ids: list[int]
    cut: int
    finish: str
    matched: int | str | None

    def keys(self, seed: int | None) -> tuple[int, int]:
        return hash((seed, tuple(self.input_ids))), hash((seed, tuple(self.input_ids + self.ids[: self.cut])))


class ScriptedEngine:
    """An ``Engine`` that replays scripted text as real tokens; no model, microseconds per call."""

    weight_sources = ALL_KINDS  # it has no weights: an update only relabels the tokens that follow

    def __init__(
        self,
        tokenizer: Any,
        replies: Sequence[str | ScriptedReply] | ReplyFn,
        *,
        eos_token_id: int | None = None,
        routing: SyntheticRouting | None = None,
        spec_draft_tokens: int = 0,
        weight_version: str = "0",
        token_delay_s: float = 0.0,
    ) -> None:
        if not callable(replies) and not replies:
            raise ValueError("ScriptedEngine needs at least one reply (or a callable)")
        from miles_envs.chat.backend import TokenizerCalls  # here: the chat package imports transformers

        self.tokenizer = tokenizer
        self._tokenizer_calls = TokenizerCalls(tokenizer)  # the Rust tokenizer directly where it matches
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: pass eos_token_id= (the end-of-turn token)")
        self._replies = replies
        self.routing = routing
        self.spec_draft_tokens = spec_draft_tokens
        self.weight_version = weight_version
        self.token_delay_s = token_delay_s
        self._calls = itertools.count()
        self._cache: dict[ScriptedReply, _Encoded] = {}
        self._running: dict[str, _Request] = {}
        self._anonymous = itertools.count()
        # (sampling seed, stream) of a possible resubmission -> the reply ids it continues, set on abort
        self._resume: dict[int, list[_Partial]] = {}

    @property
    def is_moe(self) -> bool:
        """Whether routed experts can be asked for (a ``routing`` was given)."""
        return self.routing is not None

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
        if not 0 <= routed_experts_start <= len(input_ids):
            raise ValueError(f"routed_experts_start={routed_experts_start} outside [0, {len(input_ids)}]")
        resumed = self._take_partial(input_ids, sampling) if self._resume else None
        if resumed is not None:
            output_ids, finish, matched = resumed
        else:
            context = ScriptContext(input_ids, next(self._calls), sampling, rid, lora, self.weight_version)
            output_ids, finish, matched = self._finish(self._encode(self._next_reply(context)), sampling)
        spans: list[tuple[int, str]] = [(0, self.weight_version)]
        if self.paced:
            output_ids, spans, aborted = await self._sample_slowly(input_ids, output_ids, finish, matched, sampling, rid)
            if aborted:
                finish, matched = "abort", None
        start = len(input_ids)
        logprobs = [synthetic_logprob(tid, start + i) for i, tid in enumerate(output_ids)]
        routed = None
        if return_routed_experts and self.routing is not None and output_ids:
            routed = self._routing_rows(input_ids, output_ids, routed_experts_start)
        return Generation(
            output_ids=output_ids,
            logprobs=logprobs,
            finish_reason=finish,
            routed_experts=routed,
            weight_version=spans[-1][1],
            version_spans=spans if len(spans) > 1 else [],
            prompt_tokens=len(input_ids),
            spec=self._spec(len(output_ids)),
            matched_stop=matched,
        )

    @property
    def paced(self) -> bool:
        """Whether tokens come one at a time (so updates and aborts can land mid-generation)."""
        return self.token_delay_s > 0

    async def _next_token(self) -> None:
        """Wait until the next token is sampled (a subclass may model a batched server here)."""
        await asyncio.sleep(self.token_delay_s)

    async def _sample_slowly(
        self, input_ids: list[int], ids: list[int], finish: str, matched: int | str | None, sampling: SamplingParams,
        rid: str | None,
    ) -> tuple[list[int], list[tuple[int, str]], bool]:
        """Emit ``ids`` one per ``token_delay_s``: (ids sampled, version spans, aborted)."""
        key = rid if rid is not None else f"anonymous-{next(self._anonymous)}"
        request = self._running[key] = _Request()
        spans: list[tuple[int, str]] = []
        try:
            for i in range(len(ids)):
                await self._next_token()
                if request.abort_requested:
                    self._remember_partial(_Partial(input_ids, ids, i, finish, matched), sampling.seed)
                    return ids[:i], spans or [(0, self.weight_version)], True
                if not spans or spans[-1][1] != self.weight_version:
                    spans.append((i, self.weight_version))
                request.sampled = i + 1
        finally:
            del self._running[key]
        return ids, spans or [(0, self.weight_version)], False

    def _remember_partial(self, partial: _Partial, seed: int | None) -> None:
        """A resubmission with or without the partial output continues this reply."""
        if len(self._resume) >= _CACHE_LIMIT:
            self._resume.clear()
        for key in partial.keys(seed):
            self._resume.setdefault(key, []).append(partial)

    def _take_partial(self, input_ids: list[int], sampling: SamplingParams) -> tuple[list[int], str, int | str | None] | None:
        """The reply an aborted request was writing, if ``input_ids`` resubmits it (identical streams queue up)."""
        waiting = self._resume.get(hash((sampling.seed, tuple(input_ids))))
        if not waiting:
            return None
        partial = waiting[0]
        for key in partial.keys(sampling.seed):
            queue = self._resume.get(key, [])
            if partial in queue:
                queue.remove(partial)
            if not queue:
                self._resume.pop(key, None)
        kept = len(input_ids) - len(partial.input_ids)
        return partial.ids[kept:], partial.finish, partial.matched

    def _next_reply(self, context: ScriptContext) -> ScriptedReply:
        replies = self._replies
        reply = replies(context) if callable(replies) else replies[context.call_index % len(replies)]
        return reply if isinstance(reply, ScriptedReply) else ScriptedReply(str(reply))

    def _encode(self, reply: ScriptedReply) -> _Encoded:
        encoded = self._cache.get(reply)
        if encoded is None:
            ids = list(self._tokenizer_calls.encode(reply.text))
            if reply.stop_on_eos:
                ids.append(self.eos_token_id)
            if len(self._cache) >= _CACHE_LIMIT:  # callables may produce endless distinct replies
                self._cache.clear()
            encoded = self._cache[reply] = _Encoded(ids, reply.stop_on_eos)
        return encoded

    def _finish(self, encoded: _Encoded, sampling: SamplingParams) -> tuple[list[int], str, int | str | None]:
        """Cut the scripted ids where SGLang would stop: (ids, finish_reason, matched)."""
        ids = encoded.ids
        stop_at, matched = len(ids), None
        if encoded.stop_on_eos:
            matched = self.eos_token_id
        if sampling.stop_token_ids:
            stop_ids = set(sampling.stop_token_ids)
            for i, tid in enumerate(ids[:stop_at]):
                if tid in stop_ids:
                    stop_at, matched = i + 1, tid
                    break
        for stop in sampling.stop:
            cut = self._stop_cut(encoded, stop)
            if cut is not None and cut < stop_at:
                stop_at, matched = cut, stop
        if stop_at > sampling.max_new_tokens or (stop_at == sampling.max_new_tokens and matched is not None):
            return ids[: sampling.max_new_tokens], "length", None
        if matched is None:
            # The script ran out without an end-of-turn: a real model would keep going until the limit.
            return ids[:stop_at], "length", None
        return ids[:stop_at], "stop", matched

    def _stop_cut(self, encoded: _Encoded, stop: str) -> int | None:
        """Fewest leading tokens whose decoded text contains ``stop`` (binary search, cached)."""
        if stop in encoded.stop_cut:
            return encoded.stop_cut[stop]
        ids, decode = encoded.ids, self.tokenizer.decode
        cut = None
        if stop in decode(ids):
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if stop in decode(ids[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            cut = lo
        encoded.stop_cut[stop] = cut
        return cut

    def _routing_rows(self, input_ids: list[int], output_ids: list[int], start: int) -> np.ndarray:
        # Rows exist for every processed token: the prompt and all outputs but the last.
        processed = np.asarray(input_ids[start:] + output_ids[:-1], dtype=np.int64)
        positions = np.arange(start, start + len(processed), dtype=np.int64)
        return self.routing.rows(processed, positions)

    def _spec(self, n_tokens: int) -> SpecStats | None:
        """Speculative counters as if each verify step accepted all ``spec_draft_tokens`` drafts."""
        k = self.spec_draft_tokens
        if not k or not n_tokens:
            return None
        verify_ct = math.ceil(n_tokens / (k + 1))
        return SpecStats(verify_ct=verify_ct, accepted_tokens=n_tokens - verify_ct, draft_tokens=verify_ct * k)

    async def update_weights(self, source: WeightSource | Any, *, version: str | None = None) -> None:
        """Label later tokens ``version`` (by default the source as given: a folder's path, say)."""
        weight_source(source)  # still a clear error for something that is no weight source at all
        self.weight_version = version if version is not None else str(source)

    async def abort(self, rid: str | None = None) -> None:
        """End the request ``rid`` (all requests if None) at its next token; unknown ids are ignored."""
        for key in ([rid] if rid is not None else list(self._running)):
            if key in self._running:
                self._running[key].abort_requested = True

    def progress(self) -> dict[str, int]:
        """Tokens sampled so far by each running request (``token_delay_s > 0``), by request id."""
        return {rid: request.sampled for rid, request in self._running.items()}

    async def capacity(self) -> int | None:
        """No limit on concurrent requests."""
        return None

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        """No resources to release."""
