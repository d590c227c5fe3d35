"""A mirror of Miles' ``Sample`` (miles/utils/types.py, radixark/miles @ 31f1ca9) for contract tests.

Miles cannot be installed here (it needs CUDA builds of SGLang and Megatron), so the adapter is
tested against this local dataclass: the same field names, defaults and nested ``Status`` enum, plus
Miles' own ``validate`` length checks and its rule for sibling samples of one rollout
(``validate_compact_rollout_ids`` in miles/ray/rollout/rollout_data_conversion.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy


@dataclass
class Sample:
    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] = None
    multimodal_train_inputs: dict[str, Any] = None
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_routed_experts: numpy.ndarray | None = None
    rollout_indexer_topk: numpy.ndarray | None = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None
    opd_reverse_kl: list[float] | None = None

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    train_metadata: dict | None = None

    @dataclass
    class SpecInfo:
        spec_accept_token_num: int = 0
        spec_draft_token_num: int = 0
        spec_verify_ct: int = 0
        completion_token_num: int = 0

    spec_info: SpecInfo = field(default_factory=SpecInfo)

    @dataclass
    class PrefixCacheInfo:
        cached_tokens: int = 0
        total_prompt_tokens: int = 0

    prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)

    def validate(self) -> None:
        assert self.response_length >= 0
        assert len(self.tokens) >= self.response_length
        if self.loss_mask is not None:
            assert len(self.loss_mask) == self.response_length
        if self.rollout_log_probs is not None:
            assert len(self.rollout_log_probs) == self.response_length
        if self.rollout_routed_experts is not None:
            assert len(self.rollout_routed_experts) == len(self.tokens) - 1


def validate_compact_rollout_ids(node: Any, depth: int = 0) -> None:
    """Miles' rule: siblings of one rollout (a list of Samples at depth >= 2) share a non-None rollout_id."""
    if isinstance(node, Sample):
        return
    if node and isinstance(node[0], Sample):
        if depth >= 2 and len(node) > 1:
            ids = [s.rollout_id for s in node]
            assert None not in ids, f"rollout_id unset on siblings: {ids}"
            assert len(set(ids)) == 1, f"siblings must share rollout_id: {ids}"
        return
    for item in node:
        validate_compact_rollout_ids(item, depth + 1)
