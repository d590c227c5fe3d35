"""The Engine protocol: what the env loop needs from any policy server or in-process model.

Field meanings follow SGLang's native ``/generate`` API so that the SGLang client, the embedded
engine and the scripted engine are interchangeable (see docs/sglang-protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def to_sglang(self) -> dict[str, Any]:
        """SGLang ``sampling_params``: never trim stop text, keep special tokens (token-exactness)."""
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "no_stop_trim": True,
            "skip_special_tokens": False,
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        return params


@dataclass
class SpecStats:
    """Speculative-decoding counters; summed across turns, never averaged."""

    verify_ct: int = 0
    accepted_tokens: int = 0
    draft_tokens: int = 0

    def __add__(self, other: SpecStats) -> SpecStats:
        return SpecStats(
            self.verify_ct + other.verify_ct,
            self.accepted_tokens + other.accepted_tokens,
            self.draft_tokens + other.draft_tokens,
        )

    @property
    def accept_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def accept_length(self) -> float:
        """Mean tokens emitted per verify step (accepted drafts + the bonus token)."""
        return (self.accepted_tokens + self.verify_ct) / self.verify_ct if self.verify_ct else 0.0


@dataclass
class Generation:
    """One engine call's result.

    ``routed_experts`` holds rows ``[routed_experts_start, len(input_ids) + len(output_ids) - 1)``
    as ``[rows, num_layers, topk]``: one row per *processed* token (the last sampled token is never
    fed back, so it has no row). ``logprobs[i]`` is the log-probability of ``output_ids[i]``.

    ``version_spans`` says which weights sampled which tokens: ``(first output index, version)``
    pairs in increasing index order, each span running to the next one's start. A generation that
    spans a weight update has two or more; empty means every token is ``weight_version``'s.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    routed_experts: np.ndarray | None = None
    weight_version: str | None = None
    version_spans: list[tuple[int, str]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    spec: SpecStats | None = None
    matched_stop: int | str | None = None
    error: str | None = None

    def spans(self) -> list[tuple[int, str | None]]:
        """Version spans with the single-version case made explicit."""
        return list(self.version_spans) or [(0, self.weight_version)]


@runtime_checkable
class Engine(Protocol):
    async def generate(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        *,
        return_routed_experts: bool = False,
        routed_experts_start: int = 0,
        lora: str | None = None,
        rid: str | None = None,
    ) -> Generation: ...

    async def update_weights(self, source: Any, *, version: str | None = None) -> None: ...

    async def abort(self, rid: str | None = None) -> None: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...
