"""Outcome advantages from per-trajectory rewards, normalised within groups of the same prompt.

An advantage function takes ``rewards`` (float tensor ``[n]``) and ``groups`` (long tensor ``[n]``,
equal ids = same prompt group) and returns one advantage per trajectory; every model token of a
trajectory gets its trajectory's advantage. Custom functions with this signature plug in by import
path (``TrainerConfig.advantage = "pkg.mod:fn"``).

Only completed and truncated trajectories are scored (``scored_advantages``): an aborted episode
(engine trouble) or a failed one (the env raised) says nothing about the policy, so it is left out
of its group's mean and std and gets advantage 0 (and zero loss weight in the trainer). A group
with no scored member is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def group_index(group_ids: Sequence[object]) -> torch.Tensor:
    """Dense group numbers ``0..G-1`` in order of first appearance; ``None`` is a group of its own."""
    numbers: dict[object, int] = {}
    out = []
    for i, gid in enumerate(group_ids):
        key = ("__single__", i) if gid is None else gid
        out.append(numbers.setdefault(key, len(numbers)))
    return torch.tensor(out, dtype=torch.long)


def _group_stats(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-trajectory group size, group mean and unbiased group std (0 for groups of one)."""
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    rewards = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, torch.ones_like(rewards))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, rewards)
    mean = total / count
    sq_dev = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, (rewards - mean[groups]) ** 2)
    std = torch.where(count > 1, (sq_dev / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count))
    return count[groups], mean[groups], std[groups]


def grpo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)``, std with Bessel's correction (as Miles/verl)."""
    _, mean, std = _group_stats(rewards, groups)
    return ((rewards.double() - mean) / (std + eps)).float()


def dr_grpo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: ``r - mean_group``; no std division (it biases towards easy/hard prompts)."""
    _, mean, _ = _group_stats(rewards, groups)
    return (rewards.double() - mean).float()


def rloo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j`` within the group (0 for a group of one)."""
    count, mean, _ = _group_stats(rewards, groups)
    leave_one_out = (mean * count - rewards.double()) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards.double() - leave_one_out, torch.zeros_like(mean)).float()


ADVANTAGES: dict[str, AdvantageFn] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


SCORED_STATUSES = ("completed", "truncated")


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # one per trajectory; 0 for unscored ones
    groups: int
    groups_dropped: int  # groups without a single completed or truncated member


def scored_advantages(
    fn: AdvantageFn, rewards: torch.Tensor, group_ids: Sequence[object], statuses: Sequence[str]
) -> GroupAdvantages:
    """``fn`` over the completed/truncated members of each group only; the others get 0."""
    groups = group_index(group_ids)
    scored = torch.tensor([s in SCORED_STATUSES for s in statuses], dtype=torch.bool)
    advantages = torch.zeros(len(rewards), dtype=torch.float32)
    if scored.any():
        kept = scored.nonzero().squeeze(1)
        advantages[kept] = fn(rewards[kept], group_index(groups[kept].tolist())).float()
    total = int(groups.max()) + 1 if groups.numel() else 0
    return GroupAdvantages(advantages, total, total - len(set(groups[scored].tolist())))
