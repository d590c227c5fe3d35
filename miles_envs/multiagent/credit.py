"""Role-conditioned credit assignment for multi-agent rollouts.

In a zero-sum game the seats are not symmetric (the first mover wins more often), so a baseline
shared by both seats rewards a seat, not a move. Giving each role its own group id makes the
trainer's group-normalised advantages (GRPO, Dr.GRPO, RLOO: all keyed by ``group_id``) subtract a
per-role baseline with no change to the trainer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from miles_envs.trajectory import Trajectory


def role_of(env: Any, agent: str) -> str:
    """The role ``agent`` plays in ``env`` (``env.agent_roles``, else the agent id itself)."""
    return getattr(env, "agent_roles", {}).get(agent, agent)


def role_group_id(env_id: str | None, role: str, seed: int | None = None) -> str:
    """``env#seed/role`` (one game instance) or ``env/role`` (the role across the batch)."""
    game = env_id or "env"
    return f"{game}#{seed}/{role}" if seed is not None else f"{game}/{role}"


def _role(trajectory: Trajectory) -> str:
    return trajectory.metadata.get("role") or trajectory.agent_id or "agent"


def group_by_role(trajectories: Iterable[Trajectory], *, per_seed: bool = False) -> list[Trajectory]:
    """Set each trajectory's ``group_id`` to its role's group (per game, or per game and seed).

    ``per_seed=False`` suits self-play where each seed is played once: the baseline is the role's
    mean over the whole batch. ``per_seed=True`` suits groups of repeated plays of one seed.
    """
    out = []
    for t in trajectories:
        t.group_id = role_group_id(t.env_id, _role(t), t.seed if per_seed else None)
        out.append(t)
    return out


def role_baselines(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Mean reward per ``env/role``: the baseline each role's advantages are measured against."""
    sums: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        sums[role_group_id(t.env_id, _role(t))].append(t.reward)
    return {key: sum(values) / len(values) for key, values in sums.items()}
