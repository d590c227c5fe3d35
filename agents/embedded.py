"""EmbeddedEngine: an in-process transformers model behind the Engine protocol.

A single worker thread owns the model; ``generate`` only enqueues and awaits, so the asyncio
loop never blocks. Each scheduler step (1) admits waiting requests with one left-padded prefill
forward, then (2) advances every running sequence together: one batched decode forward, or with
speculative decoding one MTP draft chain plus one batched verify forward. KV caches are per
sequence, stored as one padded batch (see ``embedded_cache``). Sampling and the reported
logprobs are described in ``embedded_sampling``.

Routing capture: every token fed to the main model (prompt, decoded, accepted drafts) leaves one
row ``[num_hidden_layers, topk]``; rejected drafts leave none, so rows equal a teacher-forced
forward. Rows of prompt tokens served from the prefix cache are the rows kept with that cache.

Prefix reuse (``embedded_prefix``): a retired sequence leaves its KV columns behind, and a new
request prefills only what follows its longest common token prefix with a kept one, so turn N of
an episode costs its new tokens, not the whole context; requests of one admission batch with the
same prompt (a GRPO group) prefill it once. ``Generation.cached_tokens`` counts the prompt tokens
not computed, as SGLang reports it. Off under speculative decoding (the MTP cache is not kept).

Weight updates apply between scheduler steps, also while requests run: those continue on their
KV caches under the new weights, and their output is split into version spans at the first token
the new weights sampled. Kept prefixes are dropped on every update.

LoRA: adapters are loaded by name (``load_lora_adapter``, or ``update_weights(..., lora=NAME)`` with
the trainer's adapter tensors) and applied unmerged per request (``generate(..., lora=NAME)``); see
``embedded_lora``. The MTP draft runs without the adapter, as in SGLang.

Speculative decoding drafts ``draft_tokens`` tokens with the checkpoint's first MTP layer
applied recursively (SGLang's NextN scheme); further stored MTP layers are kept for training
and weight sync but not used for drafting. The step is batched tensor work over all running rows
(drafting, verification, acceptance, cache trimming; see ``embedded_sampling.accept_rows``), with
one read-back per step to emit tokens, so its cost does not grow with per-row host work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from miles_envs.agents.embedded_cache import BatchedKVCache
from miles_envs.agents.embedded_lora import LoraServer, read_adapter
from miles_envs.agents.embedded_prefix import (
    MISS,
    PrefixEntry,
    PrefixHit,
    PrefixStore,
    common_prefix,
    prefilled_cache,
    row_columns,
)
from miles_envs.agents.embedded_sampling import RowSampler, accept_rows, distributions, sample_rows, sample_tensor
from miles_envs.engine import FinishReason, Generation, SamplingParams, SpecStats
from miles_envs.models.loading import LoadedCheckpoint, load_checkpoint
from miles_envs.models.routing import RoutingRecorder, moe_routers
from miles_envs.weight_sync import Tensors, WeightSource, accept


@dataclass
class _Sequence:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    sampler: RowSampler
    max_new_tokens: int
    want_routing: bool
    routing_start: int
    deliver: Callable[[Generation], None]
    lora: str | None = None
    version_spans: list[tuple[int, str]] = field(default_factory=list)
    epoch: int = 0  # the engine's weight epoch its KV cache was computed under
    cached_tokens: int = 0
    routing_offset: int = 0  # processed tokens before the first routing row held
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routing: list[torch.Tensor] = field(default_factory=list)
    spec: SpecStats = field(default_factory=SpecStats)
    finish: FinishReason | None = None
    matched_stop: int | str | None = None
    aborted: bool = False
    # The last sampled token: emitted but not yet fed to the model.
    pending: int = -1


@dataclass
class _Drafts:
    """The running rows' drafts of this round as one batch, row-aligned with the KV caches."""

    tokens: torch.Tensor  # [B, j]
    probs: torch.Tensor  # [B, j, V]: the distribution each draft was sampled from
    hidden: torch.Tensor  # [B, H]: the MTP layer's last output, the next draft's input

    def extend(self, other: _Drafts) -> None:
        self.tokens = torch.cat([self.tokens, other.tokens], dim=1)
        self.probs = torch.cat([self.probs, other.probs], dim=1)
        self.hidden = other.hidden

    def concat(self, other: _Drafts) -> None:
        self.tokens, self.probs = torch.cat([self.tokens, other.tokens]), torch.cat([self.probs, other.probs])
        self.hidden = torch.cat([self.hidden, other.hidden])

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        self.tokens, self.probs, self.hidden = self.tokens[index], self.probs[index], self.hidden[index]


class EmbeddedEngine:
    """Engine protocol over a local checkpoint; see the module docstring for the scheduling."""

    weight_sources = frozenset({"tensors", "folder"})  # in-process: the trainer's tensors or a folder

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        draft_tokens: int = 0,
        max_running: int = 64,
        weight_version: str = "0",
        prefix_cache_tokens: int = 1 << 16,
    ):
        if draft_tokens and checkpoint.mtp is None:
            raise ValueError(
                f"speculative decoding needs MTP layers but {checkpoint.path} has none: "
                "create the checkpoint with `miles-envs init-model --mtp 1` or set draft_tokens=0"
            )
        self.checkpoint = checkpoint
        self.model = checkpoint.model.requires_grad_(False)
        self.mtp = checkpoint.mtp.requires_grad_(False) if checkpoint.mtp is not None else None
        self.tokenizer = checkpoint.tokenizer
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.draft_tokens = int(draft_tokens)
        self.max_running = int(max_running)
        self.weight_version = weight_version
        self.is_moe = bool(moe_routers(self.model))
        self._prefix = PrefixStore(prefix_cache_tokens) if prefix_cache_tokens > 0 and not self.draft_tokens else None
        self._epoch = 0
        self._recorder = RoutingRecorder(self.model) if self.is_moe else None
        self._lora = LoraServer(self.model)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._admitting: list[_Sequence] = []  # out of _waiting, not yet running: a failure must still answer them
        self._running: list[_Sequence] = []
        self._cache: BatchedKVCache | None = None
        self._mtp_cache: BatchedKVCache | None = None
        self._drafts: _Drafts | None = None
        self._sequences: dict[str, _Sequence] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._worker = threading.Thread(target=self._serve, name="embedded-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_path(cls, path: str | Path, *, device=None, dtype=None, **kwargs: Any) -> EmbeddedEngine:
        """Load a checkpoint folder (config, safetensors, tokenizer); kwargs go to the constructor."""
        return cls(load_checkpoint(path, device=device, dtype=dtype), **kwargs)

    # ------------------------------------------------------------------ Engine protocol

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
        self._check_open()
        if lora is not None:
            self._lora.get(lora)  # unknown names fail here, in the caller
        if return_routed_experts and not self.is_moe:
            raise ValueError(
                f"{type(self.model).__name__} is not a mixture-of-experts model: it has no routing to return "
                "(use return_routed_experts=False)"
            )
        if not input_ids:
            raise ValueError("input_ids is empty: the engine needs at least one prompt token")
        vocab = self.model.config.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab:
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        room = self.checkpoint.context_length - len(input_ids)
        if room <= 0 or sampling.max_new_tokens <= 0:
            error = None
            if room <= 0:
                error = f"prompt of {len(input_ids)} tokens fills the context length {self.checkpoint.context_length}"
            return Generation([], [], "length", weight_version=self.weight_version, prompt_tokens=len(input_ids), error=error)

        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver(generation: Generation) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(generation))

        sequence = _Sequence(
            rid=rid or uuid.uuid4().hex,
            input_ids=list(input_ids),
            params=sampling,
            sampler=RowSampler.from_params(sampling, self.device),
            max_new_tokens=min(sampling.max_new_tokens, room),
            want_routing=return_routed_experts,
            routing_start=routed_experts_start,
            deliver=deliver,
            lora=lora,
        )
        with self._lock:
            self._sequences[sequence.rid] = sequence
        self._inbox.put(sequence)
        try:
            return await future
        except asyncio.CancelledError:
            sequence.aborted = True
            raise

    async def update_weights(self, source: WeightSource | Any, *, version: str | None = None, lora: str | None = None) -> None:
        """Load new weights between scheduler steps from ``Tensors`` (a state dict) or a ``CheckpointFolder``.

        State-dict keys use the live model's names; MTP tensors use either ``mtp.<MtpModel key>`` or
        the on-disk ``model.layers.{num_hidden_layers + i}.*`` names. Running sequences keep their
        KV caches and continue under the new weights; with ``version``, their later tokens form a
        new version span. With ``lora``, ``source`` is that adapter's new
        weights instead (peft key names, as ``Trainer.state_dict()`` gives them under LoRA, plus any
        ``mtp.*`` tensors) or an adapter folder, which also (re)loads the adapter's config.
        """
        typed = accept(source, self.weight_sources, "EmbeddedEngine")
        payload = typed.state_dict if isinstance(typed, Tensors) else typed.path
        load = (lambda: self._load_weights(payload)) if lora is None else (lambda: self._load_adapter(lora, payload))
        await self._call(lambda: self._apply_update(load, None if version is None else str(version)))

    async def capacity(self) -> int:
        """Requests decoded together at most (more wait in the queue)."""
        return self.max_running

    async def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """Serve the peft adapter folder ``path`` as ``name`` (replacing an adapter of that name)."""
        await self._call(lambda: self._apply_update(lambda: self._load_adapter(name, Path(path)), None))

    async def unload_lora_adapter(self, name: str) -> None:
        await self._call(lambda: self._unload_adapter(name))

    @property
    def lora_adapters(self) -> list[str]:
        return sorted(self._lora.adapters)

    async def abort(self, rid: str | None = None) -> None:
        with self._lock:
            targets = list(self._sequences.values()) if rid is None else [self._sequences.get(rid)]
        for sequence in targets:
            if sequence is not None:
                sequence.aborted = True
        self._inbox.put(None)

    async def health(self) -> bool:
        return self._worker.is_alive() and not self._closed and self._failure is None

    async def close(self) -> None:
        if self._closed:
            return
        await self.abort()
        self._closed = True
        self._inbox.put(None)
        await asyncio.to_thread(self._worker.join)

    # ------------------------------------------------------------------ worker thread

    def _check_open(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"embedded engine worker failed: {self._failure!r}") from self._failure
        if self._closed:
            raise RuntimeError("embedded engine is closed")

    async def _call(self, fn: Callable[[], Any]) -> Any:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting caller
                result, error = None, exc
            loop.call_soon_threadsafe(
                lambda: future.done() or (future.set_exception(error) if error else future.set_result(result))
            )

        self._inbox.put(run)
        return await future

    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                while not self._closed:
                    self._drain(block=not (self._running or self._waiting))
                    self._admit()
                    if self._running:
                        self._step()
                    self._retire()
        except BaseException as exc:  # surfaced by health() and the next call
            self._failure = exc
        finally:
            while not self._inbox.empty():
                item = self._inbox.get()
                if isinstance(item, _Sequence):
                    self._waiting.append(item)
                elif item is not None:
                    item()
            for sequence in self._waiting + self._admitting + self._running:
                sequence.aborted = True
                sequence.finish = sequence.finish or "abort"
                self._deliver(sequence, error=None if self._failure is None else repr(self._failure))

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, _Sequence):
                self._waiting.append(item)
            elif item is not None:
                with torch.no_grad(), torch.inference_mode(False):
                    item()

    # ------------------------------------------------------------------ model calls

    def _forward(self, cache: BatchedKVCache, ids: torch.Tensor, valid: torch.Tensor, batch: list[_Sequence]):
        """Main-model forward of ``batch``'s rows appending ``ids`` to ``cache``: (normed hidden,
        routing rows or None); each row runs with its request's LoRA adapter."""
        mask, positions = cache.inputs_for(valid, self.dtype)
        with self._lora.rows([s.lora for s in batch]):
            if any(s.want_routing for s in batch):
                with self._recorder.record():
                    hidden = self._decoder(ids, mask, positions, cache)
                routing = self._recorder.take(*ids.shape)
            else:
                hidden, routing = self._decoder(ids, mask, positions, cache), None
        cache.commit(valid)
        return hidden, routing

    def _decoder(self, ids, mask, positions, cache):
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache.cache, use_cache=True)
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def _mtp_forward(self, cache: BatchedKVCache, ids: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor):
        """First MTP layer over ``ids`` appended to ``cache``: its output hidden states."""
        from miles_envs.models.mtp import mtp_hidden

        mask, positions = cache.inputs_for(valid, self.dtype)
        out = mtp_hidden(self.mtp, 0, ids, hidden, positions, mask, cache.cache)
        cache.commit(valid)
        return out

    # ------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        for sequence in [s for s in self._waiting if s.aborted]:
            self._waiting.remove(sequence)
            sequence.finish = "abort"
            self._deliver(sequence)
        room = self.max_running - len(self._running)
        if room <= 0 or not self._waiting:
            return
        batch, self._waiting = self._waiting[:room], self._waiting[room:]
        self._admitting = batch
        for sequence in batch:
            sequence.version_spans, sequence.epoch = [(0, self.weight_version)], self._epoch
        # Identical requests prefill once (a group's shared prompt); only with prefix reuse on,
        # since speculative decoding keeps per-row MTP inputs.
        if self._prefix is None:
            index = list(range(len(batch)))
        else:
            keys: dict[tuple, int] = {}
            index = [keys.setdefault(self._prefill_key(s), len(keys)) for s in batch]
        firsts = [batch[index.index(u)] for u in range(max(index) + 1)]
        hits = [self._prefix_hit(s) for s in firsts]
        suffixes = [s.input_ids[hit.length :] for s, hit in zip(firsts, hits)]
        width = max(len(suffix) for suffix in suffixes)
        ids = torch.zeros(len(firsts), width, dtype=torch.long)
        valid = torch.zeros(len(firsts), width, dtype=torch.bool)
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.tensor(suffix)
            valid[row, width - len(suffix) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        cache = prefilled_cache(hits, self.device)
        hidden, routing = self._forward(cache, ids, valid, firsts)
        if len(firsts) < len(batch):
            cache.select(index)
            hidden = hidden[torch.tensor(index, device=hidden.device)]
        self._sample_next(batch, hidden[:, -1])
        for row, sequence in enumerate(batch):
            first, hit, suffix = row == index.index(index[row]), hits[index[row]], suffixes[index[row]]
            sequence.cached_tokens = hit.length if first else len(sequence.input_ids)
            if hit.routing is not None:
                sequence.routing.append(hit.routing)
            else:
                sequence.routing_offset = hit.length
            if routing is not None:
                sequence.routing.append(routing[index[row], width - len(suffix) :])
        if self.draft_tokens:
            mtp_cache = BatchedKVCache(len(batch), self.device)
            mtp_cache.next_position += 1  # MTP inputs sit one position ahead of the hidden states
            next_ids = torch.cat([ids[:, 1:], torch.tensor([[s.pending] for s in batch], device=self.device)], dim=1)
            out = self._mtp_forward(mtp_cache, next_ids, hidden, valid)
            drafts = self._draft([s.sampler for s in batch], out[:, -1])
        self._join(batch, cache, mtp_cache if self.draft_tokens else None, drafts if self.draft_tokens else None)

    def _prefill_key(self, sequence: _Sequence) -> tuple:
        return tuple(sequence.input_ids), sequence.lora, sequence.want_routing and sequence.routing_start

    def _prefix_hit(self, sequence: _Sequence) -> PrefixHit:
        """Kept columns to reuse: never the last prompt token (its hidden state samples the first
        output), and only below ``routing_start`` when the kept entry holds no routing rows."""
        if self._prefix is None:
            return MISS
        limit = len(sequence.input_ids) - 1
        hit = self._prefix.match(sequence.input_ids, sequence.lora, limit)
        query = np.asarray(sequence.input_ids, dtype=np.int64)
        for row, running in enumerate(self._running):  # e.g. group siblings still decoding
            if running.lora == sequence.lora and running.epoch == self._epoch:
                length = min(limit, common_prefix(np.asarray(self._kv_tokens(row, running), dtype=np.int64), query))
                if length > hit.length:
                    hit = PrefixHit(self._row_entry(row, running, length), length)
        if sequence.want_routing and hit.entry is not None and hit.entry.routing is None:
            hit = PrefixHit(hit.entry, min(hit.length, sequence.routing_start))
        return hit

    def _join(self, batch: list[_Sequence], cache: BatchedKVCache, mtp_cache: BatchedKVCache | None,
              drafts: _Drafts | None) -> None:
        if self._cache is None or not self._running:
            self._cache, self._mtp_cache, self._drafts = cache, mtp_cache, drafts
        else:
            self._cache.concat(cache)
            if mtp_cache is not None:
                self._mtp_cache.concat(mtp_cache)
                self._drafts.concat(drafts)
        self._running.extend(batch)
        self._admitting = []

    def _draft(self, samplers: list[RowSampler], hidden: torch.Tensor) -> _Drafts:
        """One draft per row sampled from MTP output ``hidden [B, H]``."""
        probs, _ = distributions(samplers, self.mtp._project_to_logits(hidden).float())
        return _Drafts(sample_tensor(samplers, probs)[:, None], probs[:, None], hidden)

    def _step(self) -> None:
        if self.draft_tokens:
            self._speculative_step()
            return
        ids = torch.tensor([[s.pending] for s in self._running], device=self.device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        hidden, routing = self._forward(self._cache, ids, valid, self._running)
        if routing is not None:
            for row, sequence in enumerate(self._running):
                sequence.routing.append(routing[row])
        self._sample_next(self._running, hidden[:, -1])

    def _sample_next(self, batch: list[_Sequence], hidden: torch.Tensor) -> None:
        """Sample each row's next token from the last hidden state and emit it."""
        samplers = [s.sampler for s in batch]
        probs, logprobs = distributions(samplers, self._logits(hidden))
        tokens = sample_rows(samplers, probs)
        picked = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None]).squeeze(-1).tolist()
        for sequence, token, logprob in zip(batch, tokens, picked):
            sequence.pending = token
            if sequence.finish is None:
                self._emit(sequence, [token], [logprob])

    def _speculative_step(self) -> None:
        """Draft ``k`` tokens per row, verify all rows in one forward, accept, trim the caches: all
        as batched tensor work; the host reads the outcome back once, to emit tokens."""
        running, k, drafts = self._running, self.draft_tokens, self._drafts
        samplers = [s.sampler for s in running]
        rows = torch.arange(len(running), device=self.device)
        ones = torch.ones(len(running), 1, dtype=torch.bool, device=self.device)
        for _ in range(k - 1):
            out = self._mtp_forward(self._mtp_cache, drafts.tokens[:, -1:], drafts.hidden[:, None], ones)
            drafts.extend(self._draft(samplers, out[:, -1]))

        pending = torch.tensor([[s.pending] for s in running], device=self.device)
        ids = torch.cat([pending, drafts.tokens], dim=1)
        hidden, routing = self._forward(self._cache, ids, torch.ones_like(ids, dtype=torch.bool), running)
        targets, target_logprobs = distributions(samplers, self._logits(hidden))
        accepted, tokens = accept_rows(samplers, targets, drafts.probs, drafts.tokens)
        logprobs = target_logprobs.gather(-1, tokens[..., None]).squeeze(-1)
        self._cache.drop_last(k - accepted)
        self._mtp_cache.drop_last(torch.full_like(accepted, k - 1))
        emitted = torch.arange(k + 1, device=self.device)[None] <= accepted[:, None]
        out = self._mtp_forward(self._mtp_cache, tokens, hidden, emitted)
        self._drafts = self._draft(samplers, out[rows, accepted])

        for row, (sequence, count, row_tokens, row_logprobs) in enumerate(
            zip(running, accepted.tolist(), tokens.tolist(), logprobs.tolist())
        ):
            if routing is not None:
                sequence.routing.append(routing[row, : count + 1])
            sequence.spec = sequence.spec + SpecStats(1, count, k)
            sequence.pending = row_tokens[count]
            if sequence.finish is None:
                self._emit(sequence, row_tokens[: count + 1], row_logprobs[: count + 1])

    def _emit(self, sequence: _Sequence, tokens: list[int], logprobs: list[float]) -> None:
        """Append sampled tokens, stopping at a stop id/string or the token budget."""
        stop_ids = set(sequence.params.stop_token_ids) | set(self.checkpoint.eos_token_ids)
        for token, logprob in zip(tokens, logprobs):
            sequence.output_ids.append(token)
            sequence.logprobs.append(logprob)
            if token in stop_ids:
                sequence.finish, sequence.matched_stop = "stop", token
            elif sequence.params.stop:
                text = self.tokenizer.decode(sequence.output_ids)
                matched = next((stop for stop in sequence.params.stop if stop in text), None)
                if matched is not None:
                    sequence.finish, sequence.matched_stop = "stop", matched
            if sequence.finish is None and len(sequence.output_ids) >= sequence.max_new_tokens:
                sequence.finish = "length"
            if sequence.finish is not None:
                return

    def _retire(self) -> None:
        if not self._running:  # e.g. a weight update before the first request: no cache exists yet
            return
        for sequence in self._running:
            if sequence.aborted and sequence.finish is None:
                sequence.finish = "abort"
        done = [row for row, s in enumerate(self._running) if s.finish is not None]
        if not done:
            self._cache.compact()
            if self._mtp_cache is not None:
                self._mtp_cache.compact()
            return
        keep = [row for row, s in enumerate(self._running) if s.finish is None]
        for row in done:
            self._keep_prefix(row, self._running[row])
            self._deliver(self._running[row])
        self._running = [self._running[row] for row in keep]
        self._cache.select(keep)
        if self._mtp_cache is not None:
            self._mtp_cache.select(keep)
            self._drafts.select(keep)

    def _kv_tokens(self, row: int, sequence: _Sequence) -> list[int]:
        """The ids whose KV columns ``row`` of the running cache holds."""
        return (sequence.input_ids + sequence.output_ids)[: int(self._cache.valid[row].sum())]

    def _row_entry(self, row: int, sequence: _Sequence, count: int) -> PrefixEntry:
        """The first ``count`` KV columns (and routing rows, when held from token 0) of a running row."""
        routing = None
        if sequence.want_routing and sequence.routing_offset == 0 and sequence.routing:
            routing = torch.cat(sequence.routing)[:count]
        tokens = np.asarray(self._kv_tokens(row, sequence)[:count], dtype=np.int64)
        return PrefixEntry(tokens, row_columns(self._cache, row, count), routing)

    def _keep_prefix(self, row: int, sequence: _Sequence) -> None:
        """Leave the row's KV columns (all computed under the current weights) in the prefix store."""
        if self._prefix is None or sequence.epoch != self._epoch:
            return
        self._prefix.put(self._row_entry(row, sequence, len(self._kv_tokens(row, sequence))), sequence.lora)

    def _deliver(self, sequence: _Sequence, error: str | None = None) -> None:
        with self._lock:
            self._sequences.pop(sequence.rid, None)
        routed = None
        if sequence.want_routing:
            rows = len(sequence.input_ids) + len(sequence.output_ids) - 1
            stacked = torch.cat(sequence.routing) if sequence.routing else torch.zeros(0, 0, 0, dtype=torch.int32)
            start = sequence.routing_start - sequence.routing_offset
            routed = stacked[: rows - sequence.routing_offset][start:].numpy().astype(np.int32)
        spans = sequence.version_spans
        if len(spans) == 1 and spans[0][1] == self.weight_version:
            spans = []
        sequence.deliver(
            Generation(
                output_ids=list(sequence.output_ids),
                logprobs=list(sequence.logprobs),
                finish_reason=sequence.finish or "abort",
                routed_experts=routed,
                weight_version=self.weight_version,
                version_spans=list(spans),
                prompt_tokens=len(sequence.input_ids),
                cached_tokens=sequence.cached_tokens,
                spec=sequence.spec if self.draft_tokens else None,
                matched_stop=sequence.matched_stop,
                error=error,
            )
        )

    # ------------------------------------------------------------------ weights

    def _apply_update(self, load: Callable[[], None], version: str | None) -> None:
        """Load new weights between steps; running sequences' later tokens get ``version``."""
        load()
        self._epoch += 1
        if self._prefix is not None:
            self._prefix.flush()
        if version is None or version == self.weight_version:
            return
        for sequence in self._running:
            start = len(sequence.output_ids)
            if sequence.version_spans[-1][0] == start:
                sequence.version_spans[-1] = (start, version)
            else:
                sequence.version_spans.append((start, version))
        self.weight_version = version

    def _load_adapter(self, name: str, source: Any) -> None:
        if isinstance(source, (str, Path)):
            self._lora.load(name, *read_adapter(source))
            return
        self._lora.update(name, {k: v for k, v in source.items() if not k.startswith("mtp.")})
        mtp_state = {k: v for k, v in source.items() if k.startswith("mtp.")}
        if mtp_state:
            self._load_weights(mtp_state)

    def _unload_adapter(self, name: str) -> None:
        in_use = sum(s.lora == name for s in self._waiting + self._running)
        if in_use:
            raise ValueError(f"LoRA adapter {name!r} is in use by {in_use} running requests: unload it when they finish")
        self._lora.unload(name)

    def _load_weights(self, source: Any) -> None:
        from miles_envs.models.mtp import is_mtp_key, load_mtp_tensors, read_mtp_tensors

        layers = self.model.config.num_hidden_layers
        if isinstance(source, (str, Path)):
            fresh = load_checkpoint(source, device="cpu", dtype=self.dtype)
            main, mtp_tensors = fresh.model.state_dict(), read_mtp_tensors(fresh.path, layers)
            mtp_state = {}
        else:
            main = {k: v for k, v in source.items() if not k.startswith("mtp.") and not is_mtp_key(k, layers)}
            mtp_tensors = {k: v for k, v in source.items() if is_mtp_key(k, layers)}
            mtp_state = {k[len("mtp.") :]: v for k, v in source.items() if k.startswith("mtp.")}
        unknown = set(main) - set(self.model.state_dict())
        if any(".lora_A." in k or ".lora_B." in k for k in unknown):
            raise ValueError("update_weights got LoRA adapter tensors: pass lora=NAME to update a served adapter")
        if unknown:
            raise ValueError(f"update_weights got keys the model does not have: {sorted(unknown)[:5]}")
        self.model.load_state_dict(main, strict=False)
        if (mtp_tensors or mtp_state) and self.mtp is None:
            raise ValueError("update_weights got MTP weights but the engine was loaded without MTP layers")
        if mtp_tensors:
            load_mtp_tensors(self.mtp, self.model, mtp_tensors)
        if mtp_state:
            self.mtp.load_state_dict(mtp_state, strict=False)
