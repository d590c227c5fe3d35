"""Trajectory: one agent's episode as the exact token stream the engine saw and produced.

Token layout: ``tokens = prompt_ids + response_ids``. ``loss_mask``/``logprobs`` are aligned with
``response_ids`` (1 and the sampling logprob on model tokens, 0 and 0.0 on env/template tokens).
``routed_experts`` has one row per token that was *fed to* the model, i.e. ``len(tokens) - 1`` rows
of ``[num_layers, topk]``, stored in the smallest unsigned dtype that holds the expert count.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from miles_envs.env import Message


class Status(str, Enum):
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


class TrajectoryError(ValueError):
    """A trajectory violates its own invariants."""


@dataclass
class Turn:
    """One contiguous span of ``response_ids`` written by the model or by the env/template."""

    kind: str  # "model" | "env"
    start: int  # offset into response_ids
    end: int
    finish_reason: str | None = None
    weight_version: str | None = None
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0
    spec_draft_tokens: int = 0
    # (response offset, version) where a model turn spans a weight update; empty: all weight_version's.
    version_spans: list[tuple[int, str]] = field(default_factory=list)

    def spans(self) -> list[tuple[int, int, str | None]]:
        """``(start, end, version)`` pieces tiling this turn."""
        starts = [(int(s), v) for s, v in self.version_spans] or [(self.start, self.weight_version)]
        ends = [s for s, _ in starts[1:]] + [self.end]
        return [(s, e, v) for (s, v), e in zip(starts, ends)]


def version_number(version: str | None) -> int | None:
    """The integer a weight version counts by (``"step-12"`` → 12, ``"3"`` → 3); None if it has none."""
    if version is None:
        return None
    digits = re.search(r"(\d+)$", str(version))
    return int(digits.group(1)) if digits else None


def expert_dtype(num_experts: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds expert ids ``0..num_experts-1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routed_experts: np.ndarray | None = None
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    status: Status = Status.COMPLETED
    error: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    env_id: str | None = None
    group_id: str | None = None
    agent_id: str | None = None
    episode_id: str | None = None
    seed: int | None = None
    flags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    # -- views ---------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def num_turns(self) -> int:
        return sum(1 for t in self.turns if t.kind == "model")

    def model_version_spans(self) -> list[tuple[int, int, str | None]]:
        """``(start, end, version)`` over ``response_ids`` for every model token, in order."""
        return [piece for t in self.turns if t.kind == "model" for piece in t.spans()]

    @property
    def version_range(self) -> tuple[int | None, int | None]:
        """Oldest and newest weight version (as numbers) that sampled any token of this trajectory."""
        numbers = [n for *_, v in self.model_version_spans() if (n := version_number(v)) is not None]
        return (min(numbers), max(numbers)) if numbers else (None, None)

    # -- invariants ----------------------------------------------------------------------------
    def validate(self) -> Trajectory:
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise TrajectoryError(
                f"loss_mask ({len(self.loss_mask)}) and logprobs ({len(self.logprobs)}) must match "
                f"response_ids ({n})"
            )
        for i, (m, lp) in enumerate(zip(self.loss_mask, self.logprobs)):
            if m not in (0, 1):
                raise TrajectoryError(f"loss_mask[{i}]={m}: must be 0 or 1")
            if m == 0 and lp != 0.0:
                raise TrajectoryError(f"logprobs[{i}]={lp} on an env token: env tokens carry 0.0")
        position = 0
        for turn in self.turns:
            if turn.start != position or turn.end < turn.start:
                raise TrajectoryError(f"turn spans must tile response_ids: got {turn.start}..{turn.end} at {position}")
            expected = 1 if turn.kind == "model" else 0
            if any(m != expected for m in self.loss_mask[turn.start : turn.end]):
                raise TrajectoryError(f"{turn.kind} turn {turn.start}..{turn.end} has loss_mask != {expected}")
            starts = [int(start) for start, _ in turn.version_spans]
            if starts and (turn.kind != "model" or starts[0] != turn.start or starts != sorted(set(starts))
                           or starts[-1] >= max(turn.end, turn.start + 1)):
                raise TrajectoryError(
                    f"{turn.kind} turn {turn.start}..{turn.end}: version spans {turn.version_spans} must start at the "
                    "turn's start and increase inside it (model turns only)"
                )
            position = turn.end
        if self.turns and position != n:
            raise TrajectoryError(f"turn spans end at {position}, response has {n} tokens")
        if self.routed_experts is not None:
            rows = len(self.prompt_ids) + n - 1
            if self.routed_experts.ndim != 3 or self.routed_experts.shape[0] != rows:
                raise TrajectoryError(
                    f"routed_experts shape {self.routed_experts.shape}: expected [{rows}, layers, topk] "
                    "(one row per token fed to the model)"
                )
        if self.status is Status.FAILED and not self.error:
            raise TrajectoryError("a failed trajectory must carry its error")
        return self

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe and lossless (floats round-trip through repr; routing as base64 bytes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("routed_experts", "turns")}
        out["status"] = self.status.value
        out["turns"] = [asdict(t) for t in self.turns]
        out["routed_experts"] = _encode_array(self.routed_experts)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        data = dict(data)
        data["turns"] = [Turn(**t) for t in data.get("turns") or []]
        data["routed_experts"] = _decode_array(data.get("routed_experts"))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls.from_dict(json.loads(line))

    def to_sample(self) -> dict[str, Any]:
        """The Miles ``Sample`` field set (routing as int32, as Miles' R3 path expects)."""
        routed = None if self.routed_experts is None else self.routed_experts.astype(np.int32)
        return {
            "tokens": self.tokens,
            "response_length": len(self.response_ids),
            "loss_mask": list(self.loss_mask),
            "rollout_log_probs": list(self.logprobs),
            "rollout_routed_experts": routed,
            "reward": self.reward,
            "status": self.status.name,
            "metadata": {
                **self.metadata,
                "trajectory_id": self.id,
                "env_id": self.env_id,
                "group_id": self.group_id,
                "agent_id": self.agent_id,
                "episode_id": self.episode_id,
                "seed": self.seed,
                "reward_components": dict(self.reward_components),
                "flags": list(self.flags),
                "error": self.error,
            },
        }


def _encode_array(array: np.ndarray | None) -> dict[str, Any] | None:
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}


def _decode_array(encoded: dict[str, Any] | None) -> np.ndarray | None:
    if encoded is None:
        return None
    raw = base64.b64decode(encoded["b64"])
    return np.frombuffer(raw, dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"]).copy()
