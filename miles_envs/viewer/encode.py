"""Turning trajectories into the compact JSON records the page embeds.

Each episode becomes one summary row (what the list and the filters need) and one detail record
(messages, tokens, mask, logprobs, tool-call spans, routing), parsed by the page only when the
episode is opened.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

from miles_envs.trajectory import Trajectory
from miles_envs.viewer.tool_spans import tool_call_spans

SUMMARY_COLUMNS = (
    "id",
    "env_id",
    "agent_id",
    "group_id",
    "seed",
    "status",
    "reward",
    "reward_components",
    "flags",
    "error",
    "prompt_tokens",
    "response_tokens",
    "model_tokens",
    "turns",
)
ERROR_PREVIEW_CHARS = 300
LOGPROB_DIGITS = 4
# numpy dtype (kind + item size) -> typed array the page decodes routing into
_JS_TYPED_ARRAYS = {"u1": "Uint8Array", "u2": "Uint16Array", "u4": "Uint32Array", "i1": "Int8Array", "i2": "Int16Array", "i4": "Int32Array"}


class TokenTexts:
    """Decoded text of each token id, decoded once per distinct id; the table the page embeds."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.table: dict[int, str] = {}

    def texts(self, ids: list[int]) -> list[str]:
        unseen = sorted(set(ids) - self.table.keys())
        if unseen:
            decoded = self._tokenizer.batch_decode(
                [[i] for i in unseen], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            self.table.update(zip(unseen, decoded))
        return [self.table[i] for i in ids]


def to_script_json(value: Any) -> str:
    """ASCII JSON safe inside ``<script>``: one character per byte, so offsets in the page are exact.

    Non-finite floats (a ``-inf`` logprob, a ``nan`` reward) become the strings JavaScript's
    ``Number()`` reads back ("NaN", "Infinity", "-Infinity"); JSON itself has no such values.
    """
    try:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def summary_row(trajectory: Trajectory) -> list[Any]:
    error = trajectory.error
    if error and len(error) > ERROR_PREVIEW_CHARS:
        error = error[:ERROR_PREVIEW_CHARS] + "…"
    return [
        trajectory.id,
        trajectory.env_id,
        trajectory.agent_id,
        trajectory.group_id,
        trajectory.seed,
        trajectory.status.value,
        trajectory.reward,
        trajectory.reward_components,
        trajectory.flags,
        error,
        len(trajectory.prompt_ids),
        len(trajectory.response_ids),
        trajectory.num_model_tokens,
        trajectory.num_turns,
    ]


def episode_detail(trajectory: Trajectory, token_texts: TokenTexts | None, include_routing: bool) -> dict[str, Any]:
    prompt_length = len(trajectory.prompt_ids)
    detail: dict[str, Any] = {
        "messages": trajectory.messages,
        "prompt": trajectory.prompt_ids,
        "response": trajectory.response_ids,
        "mask": "".join("1" if m else "0" for m in trajectory.loss_mask),
        "logprobs": [round(lp, LOGPROB_DIGITS) for lp, m in zip(trajectory.logprobs, trajectory.loss_mask) if m],
        "turns": [
            [t.kind, t.start, t.end, t.finish_reason, t.weight_version, t.spec_accepted_tokens, t.spec_draft_tokens]
            for t in trajectory.turns
        ],
        "error": trajectory.error,
        "metadata": trajectory.metadata,
        "episode_id": trajectory.episode_id,
        "tool_spans": [],
        "routing": None if trajectory.routed_experts is None else routing_payload(trajectory.routed_experts, include_routing),
    }
    if token_texts is not None:
        texts = token_texts.texts(trajectory.tokens)
        for start, end in model_spans(trajectory):
            detail["tool_spans"] += tool_call_spans(texts, prompt_length + start, prompt_length + end)
    return detail


def model_spans(trajectory: Trajectory) -> list[tuple[int, int]]:
    """``[start, end)`` spans of response tokens written by the model (turns, else runs of mask 1)."""
    if trajectory.turns:
        return [(t.start, t.end) for t in trajectory.turns if t.kind == "model"]
    spans, start = [], None
    for i, m in enumerate([*trajectory.loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def routing_payload(routed_experts: np.ndarray, include_data: bool) -> dict[str, Any]:
    """Shape always (it says which tokens carry routing); the experts, as little-endian base64, on request."""
    payload: dict[str, Any] = {"shape": list(routed_experts.shape)}
    if include_data:
        array = routed_experts
        if f"{array.dtype.kind}{array.dtype.itemsize}" not in _JS_TYPED_ARRAYS:
            array = array.astype(np.int32)
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        payload["type"] = _JS_TYPED_ARRAYS[f"{array.dtype.kind}{array.dtype.itemsize}"]
        payload["b64"] = base64.b64encode(array.tobytes()).decode("ascii")
    return payload
