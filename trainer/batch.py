"""Trajectories -> packed micro-batches.

Layout: the model is fed ``tokens[:-1]`` and predicts ``tokens[1:]``, so input position ``j`` of a
trajectory carries the loss mask, rollout logprob and advantage of token ``j + 1`` and the routing
row ``j`` of ``Trajectory.routed_experts`` (whose rows are exactly the tokens fed to the engine).

Packing: sequences are placed first-fit-decreasing into rows of at most ``max_row_tokens`` input
positions; ``position_ids`` restart at 0 for every sequence. With no 2-D attention mask, HF
transformers derives a block-diagonal causal mask from restarting position ids (sdpa/eager build it
explicitly, flash-attention runs varlen), so no sequence ever attends to another. Rows of one
micro-batch are right-padded to the same length; padding is its own pseudo-sequence (positions
restart, loss mask 0, routing -1, ``seq_index`` -1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from miles_envs.trajectory import Trajectory, version_number

PAD_EXPERT = -1


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, T] long
    position_ids: torch.Tensor  # [rows, T] long, restarting per sequence
    targets: torch.Tensor  # [rows, T] long: the next token at each position
    loss_mask: torch.Tensor  # [rows, T] float
    rollout_logprobs: torch.Tensor  # [rows, T] float
    rollout_versions: torch.Tensor  # [rows, T] long: weights version that sampled the target, -1 where unknown
    advantages: torch.Tensor  # [rows, T] float
    token_coef: torch.Tensor  # [rows, T] float: aggregation coefficient x trajectory weight
    seq_index: torch.Tensor  # [rows, T] long: sequence number within this micro-batch, -1 on padding
    routed_experts: torch.Tensor | None  # [rows, T, layers, topk] long, -1 where no replay row
    trajectory_indices: list[int]  # input-list index of each sequence number

    @property
    def num_sequences(self) -> int:
        return len(self.trajectory_indices)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedBatch(**moved)


@dataclass
class _Sequence:
    index: int
    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    rollout_logprobs: np.ndarray
    rollout_versions: np.ndarray
    routing: np.ndarray | None

    def __len__(self) -> int:
        return len(self.inputs)


def _to_sequence(index: int, trajectory: Trajectory) -> _Sequence | None:
    tokens = np.asarray(trajectory.tokens, dtype=np.int64)
    if len(tokens) < 2 or not trajectory.response_ids:
        return None
    prompt_len = len(trajectory.prompt_ids)
    loss_mask = np.zeros(len(tokens) - 1, dtype=np.float32)
    rollout_logprobs = np.zeros(len(tokens) - 1, dtype=np.float32)
    loss_mask[prompt_len - 1 :] = np.asarray(trajectory.loss_mask, dtype=np.float32)
    rollout_logprobs[prompt_len - 1 :] = np.asarray(trajectory.logprobs, dtype=np.float32)
    rollout_versions = np.full(len(tokens) - 1, -1, dtype=np.int64)
    for start, end, version in trajectory.model_version_spans():
        number = version_number(version)
        if number is not None:
            rollout_versions[prompt_len - 1 + start : prompt_len - 1 + end] = number
    routing = None if trajectory.routed_experts is None else np.asarray(trajectory.routed_experts, dtype=np.int64)
    if routing is not None and (routing.ndim != 3 or len(routing) != len(tokens) - 1):
        raise ValueError(
            f"trajectory {trajectory.id}: routed_experts shape {routing.shape}, expected "
            f"[{len(tokens) - 1}, layers, topk] (one row per token fed to the engine)"
        )
    return _Sequence(index, tokens[:-1], tokens[1:], loss_mask, rollout_logprobs, rollout_versions, routing)


def _first_fit_decreasing(sequences: list[_Sequence], capacity: int) -> list[list[_Sequence]]:
    rows: list[list[_Sequence]] = []
    room: list[int] = []
    for seq in sorted(sequences, key=len, reverse=True):
        slot = next((i for i, free in enumerate(room) if free >= len(seq)), None)
        if slot is None:  # a sequence longer than the capacity gets a row of its own
            rows.append([seq])
            room.append(capacity - len(seq))
        else:
            rows[slot].append(seq)
            room[slot] -= len(seq)
    return rows


def pack(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float],
    token_coefs: Sequence[float],
    *,
    max_row_tokens: int = 4096,
    rows_per_micro_batch: int = 1,
    pad_token_id: int = 0,
) -> list[PackedBatch]:
    """Pack trajectories into micro-batches; ``advantages``/``token_coefs`` are per trajectory."""
    if not len(trajectories) == len(advantages) == len(token_coefs):
        raise ValueError("trajectories, advantages and token_coefs must have one entry per trajectory")
    sequences = [s for i, t in enumerate(trajectories) if (s := _to_sequence(i, t)) is not None]
    routing_shape = next((s.routing.shape[1:] for s in sequences if s.routing is not None), None)
    for seq in sequences:
        if seq.routing is not None and seq.routing.shape[1:] != routing_shape:
            raise ValueError(
                f"trajectory {trajectories[seq.index].id}: routed_experts layers/topk {seq.routing.shape[1:]} "
                f"differ from {routing_shape}; all trajectories of a batch must come from the same model"
            )
    rows = _first_fit_decreasing(sequences, max_row_tokens)
    return [
        _build_micro_batch(rows[i : i + rows_per_micro_batch], advantages, token_coefs, routing_shape, pad_token_id)
        for i in range(0, len(rows), rows_per_micro_batch)
    ]


def _build_micro_batch(
    rows: list[list[_Sequence]],
    advantages: Sequence[float],
    token_coefs: Sequence[float],
    routing_shape: tuple[int, ...] | None,
    pad_token_id: int,
) -> PackedBatch:
    width = max(sum(len(s) for s in row) for row in rows)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    targets = np.full(shape, pad_token_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    seq_index = np.full(shape, -1, dtype=np.int64)
    loss_mask, rollout_logprobs, adv, coef = (np.zeros(shape, dtype=np.float32) for _ in range(4))
    rollout_versions = np.full(shape, -1, dtype=np.int64)
    routing = None if routing_shape is None else np.full(shape + tuple(routing_shape), PAD_EXPERT, dtype=np.int64)
    trajectory_indices: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for seq in row:
            span = slice(start, start + len(seq))
            input_ids[r, span] = seq.inputs
            targets[r, span] = seq.targets
            position_ids[r, span] = np.arange(len(seq))
            loss_mask[r, span] = seq.loss_mask
            rollout_logprobs[r, span] = seq.rollout_logprobs
            rollout_versions[r, span] = seq.rollout_versions
            adv[r, span] = advantages[seq.index]
            coef[r, span] = token_coefs[seq.index]
            seq_index[r, span] = len(trajectory_indices)
            if routing is not None and seq.routing is not None:
                routing[r, span] = seq.routing
            trajectory_indices.append(seq.index)
            start += len(seq)
        position_ids[r, start:] = np.arange(width - start)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        targets=torch.from_numpy(targets),
        loss_mask=torch.from_numpy(loss_mask),
        rollout_logprobs=torch.from_numpy(rollout_logprobs),
        rollout_versions=torch.from_numpy(rollout_versions),
        advantages=torch.from_numpy(adv),
        token_coef=torch.from_numpy(coef),
        seq_index=torch.from_numpy(seq_index),
        routed_experts=None if routing is None else torch.from_numpy(routing),
        trajectory_indices=trajectory_indices,
    )
