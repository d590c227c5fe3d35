"""``TurnBasedEnv``: the bookkeeping of a turn-based ``MultiAgentEnv``, so games only write rules.

The contract every multi-agent env follows (and ``check_env`` verifies):

- ``reset`` returns ``({agent: messages}, {agent: info})``; ``env.agents`` lists the live agents and
  ``env.agent_selection`` the one whose action the next ``step`` takes.
- ``step(action)`` returns ``(observations, rewards, terminations, truncations, infos)``: dicts keyed
  by agent. ``observations[a]`` holds only the new messages agent ``a`` may see; an agent absent
  from it sees nothing new. Rewards are per step (the loop sums them). ``terminations`` and
  ``truncations`` name every agent live before the step.
- When every agent is terminated or truncated the episode is over and ``agents`` is empty.
- ``info[agent]["private_view"]`` at reset (optional) lists strings only that agent may ever see;
  the checker asserts they never reach another agent.
- ``agent_roles`` maps agent ids to roles (agents of one role share a baseline); default: the id.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

from miles_envs.env import Message, MultiAgentEnv, Observation

MultiResetResult = tuple[dict[str, Observation], dict[str, dict[str, Any]]]
MultiStepResult = tuple[
    dict[str, Observation], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]
]


@dataclass
class AgentStep:
    """What one move did: new messages per agent, rewards, who moves next, whether the game is over."""

    observations: dict[str, list[Message]] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    next_agent: str | None = None
    terminated: bool = False
    truncated: bool = False
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)


class TurnBasedEnv(MultiAgentEnv):
    """Subclasses implement ``start`` (new game → first messages) and ``play`` (one agent's move)."""

    run_inline = True

    def __init__(self) -> None:
        self.agents: list[str] = []
        self.agent_selection = ""
        self.agent_roles: dict[str, str] = {agent: agent for agent in self.possible_agents}

    @abstractmethod
    def start(self, seed: int | None, options: dict[str, Any] | None) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]], str]:
        """Set up a new game: (messages per agent, info per agent, the agent to move first)."""

    @abstractmethod
    def play(self, agent: str, action: Message) -> AgentStep:
        """Apply ``agent``'s action and say what it did."""

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> MultiResetResult:
        observations, infos, first = self.start(seed, options)
        self.agents = list(self.possible_agents)
        self.agent_selection = first
        return (
            {agent: list(observations.get(agent, [])) for agent in self.agents},
            {agent: dict(infos.get(agent, {})) for agent in self.agents},
        )

    def step(self, action: Message) -> MultiStepResult:
        if not self.agents:
            raise RuntimeError(f"{type(self).__name__}.step() with no live agent: call reset() first")
        live = list(self.agents)
        result = self.play(self.agent_selection, action)
        over = result.terminated or result.truncated
        if over:
            self.agents = []
        elif result.next_agent is not None:
            if result.next_agent not in live:
                raise RuntimeError(f"play() chose {result.next_agent!r} to move next; live agents are {live}")
            self.agent_selection = result.next_agent
        return (
            {agent: list(messages) for agent, messages in result.observations.items()},
            {agent: float(result.rewards.get(agent, 0.0)) for agent in live},
            {agent: result.terminated for agent in live},
            {agent: result.truncated and not result.terminated for agent in live},
            {agent: dict(result.infos.get(agent, {})) for agent in live},
        )

    def next_after(self, agent: str) -> str:
        """The agent after ``agent`` in ``possible_agents`` order (round robin)."""
        order = self.possible_agents
        return order[(order.index(agent) + 1) % len(order)]
