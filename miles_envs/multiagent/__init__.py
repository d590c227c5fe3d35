"""Multi-agent building blocks: env base classes, opponent pools and role-conditioned credit."""

from miles_envs.multiagent.credit import group_by_role, role_baselines, role_group_id, role_of
from miles_envs.multiagent.pool import OpponentPool
from miles_envs.multiagent.simultaneous import SimultaneousMovesEnv
from miles_envs.multiagent.turn_based import AgentStep, TurnBasedEnv

__all__ = [
    "AgentStep", "OpponentPool", "SimultaneousMovesEnv", "TurnBasedEnv",
    "group_by_role", "role_baselines", "role_group_id", "role_of",
]
