"""Prefix reuse for the embedded engine: finished sequences leave their KV cache behind.

A multi-turn episode sends, every turn, the previous turn's input plus its output plus the env's
reply. When a sequence retires, its per-layer keys/values (one column per processed token) are
kept under its token ids; a later request reuses the columns of the longest common token prefix
with any kept entry and prefills only the rest. That is how "the same episode" is recognised:
by its token ids, never by a session id, so any caller (the env loop, an SGLang-protocol client)
benefits. Sequences still running are matched the same way (the engine copies their columns), so
siblings of a GRPO group share their common prompt even when they arrive one after another.

Entries are invalid once the weights change (the store is flushed on every update), are keyed by
LoRA adapter, and are bounded by a total token budget with least-recently-used eviction. An
entry that another entry extends is dropped, since the longer one serves every prefix it served.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from miles_envs.agents.embedded_cache import BatchedKVCache


@dataclass
class PrefixEntry:
    tokens: np.ndarray  # the ids whose columns are kept
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [heads, len(tokens), dim]
    routing: torch.Tensor | None  # [len(tokens), layers, topk] when the sequence captured it from token 0


@dataclass
class PrefixHit:
    entry: PrefixEntry | None
    length: int  # columns to reuse

    @property
    def routing(self) -> torch.Tensor | None:
        return None if self.entry is None or self.entry.routing is None else self.entry.routing[: self.length]


MISS = PrefixHit(None, 0)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    equal = a[:n] == b[:n]
    return n if equal.all() else int(equal.argmin())


class PrefixStore:
    """Kept KV columns by (LoRA adapter, token ids), within ``max_tokens`` tokens in total."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = int(max_tokens)
        self._entries: OrderedDict[int, tuple[str | None, PrefixEntry]] = OrderedDict()
        self._next_key = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids: list[int], lora: str | None, limit: int) -> PrefixHit:
        """The entry sharing the longest token prefix with ``ids`` (at most ``limit`` columns)."""
        if not self._entries or limit <= 0:
            return MISS
        query = np.asarray(ids, dtype=np.int64)
        best_key, best = None, 0
        for key, (adapter, entry) in self._entries.items():
            if adapter == lora:
                length = common_prefix(entry.tokens, query)
                if length > best:
                    best_key, best = key, length
        if best_key is None:
            return MISS
        self._entries.move_to_end(best_key)
        return PrefixHit(self._entries[best_key][1], min(best, limit))

    def put(self, entry: PrefixEntry, lora: str | None) -> None:
        if not len(entry.tokens) or len(entry.tokens) > self.max_tokens:
            return
        for key, (adapter, old) in list(self._entries.items()):
            if adapter == lora and len(old.tokens) <= len(entry.tokens) and common_prefix(old.tokens, entry.tokens) == len(old.tokens):
                self._drop(key)
        self._entries[self._next_key] = (lora, entry)
        self._next_key += 1
        self.tokens += len(entry.tokens)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        _, entry = self._entries.pop(key)
        self.tokens -= len(entry.tokens)

    def flush(self) -> None:
        self._entries.clear()
        self.tokens = 0


def row_columns(cache: BatchedKVCache, row: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the first ``count`` valid columns of ``row``, per layer: ``[heads, count, dim]``."""
    columns = cache.valid[row].nonzero().flatten()[:count]
    return [(layer.keys[row].index_select(1, columns).clone(), layer.values[row].index_select(1, columns).clone())
            for layer in cache._layers()]


def prefilled_cache(hits: list[PrefixHit], device: torch.device) -> BatchedKVCache:
    """A batch cache whose row ``i`` holds ``hits[i]``'s reused columns, right-aligned (left holes)."""
    cache = BatchedKVCache(len(hits), device)
    width = max(hit.length for hit in hits)
    if width == 0:
        return cache
    sample = next(hit.entry.layers for hit in hits if hit.length)
    for layer in range(len(sample)):
        keys = sample[layer][0].new_zeros(len(hits), sample[layer][0].shape[0], width, sample[layer][0].shape[2])
        values = keys.clone()
        for row, hit in enumerate(hits):
            if hit.length:
                k, v = hit.entry.layers[layer]
                keys[row, :, width - hit.length :] = k[:, : hit.length]
                values[row, :, width - hit.length :] = v[:, : hit.length]
        cache.cache.update(keys.to(device), values.to(device), layer)
    valid = torch.zeros(len(hits), width, dtype=torch.bool, device=device)
    for row, hit in enumerate(hits):
        valid[row, width - hit.length :] = True
    cache.commit(valid)
    return cache

