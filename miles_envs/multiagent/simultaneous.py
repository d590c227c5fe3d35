"""``SimultaneousMovesEnv``: simultaneous moves played through the turn-based protocol.

Like PettingZoo's parallel-to-AEC conversion: agents are asked one after another, their actions
are held back until every live agent has moved, then ``resolve`` sees them all at once. No agent
learns another's action of the same round before it has moved itself.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from miles_envs.env import Message
from miles_envs.multiagent.turn_based import AgentStep, TurnBasedEnv


class SimultaneousMovesEnv(TurnBasedEnv):
    """Subclasses implement ``begin`` (new game → first messages) and ``resolve`` (one round)."""

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[str, Message] = {}

    @abstractmethod
    def begin(self, seed: int | None, options: dict[str, Any] | None) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        """Set up a new game: (messages per agent, info per agent)."""

    @abstractmethod
    def resolve(self, actions: dict[str, Message]) -> AgentStep:
        """Apply one round of actions (one per agent); ``next_agent`` is ignored."""

    def start(self, seed: int | None, options: dict[str, Any] | None):
        self._held = {}
        observations, infos = self.begin(seed, options)
        return observations, infos, self.possible_agents[0]

    def play(self, agent: str, action: Message) -> AgentStep:
        self._held[agent] = action
        waiting = [a for a in self.agents if a not in self._held]
        if waiting:
            return AgentStep(next_agent=waiting[0])
        actions, self._held = self._held, {}
        result = self.resolve(actions)
        result.next_agent = self.agents[0]
        return result
