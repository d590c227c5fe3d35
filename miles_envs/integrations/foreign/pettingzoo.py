"""PettingZoo AEC envs with text observations: the board or vector is written out, the move is a number.

Each agent sees its observation as text plus the legal moves; its reply's last integer is the move.
A reply without a legal move ends the game with -1 for the mover and 0 for the others, as
PettingZoo's own ``TerminateIllegalWrapper`` scores illegal moves. Agents that PettingZoo marks done
are stepped with ``None`` as the AEC contract requires.
"""

from __future__ import annotations

import importlib
import importlib.resources
import re
from typing import Any

import numpy as np

from miles_envs.env import Message, MultiAgentEnv, user
from miles_envs.integrations.foreign.common import foreign_spec, require
from miles_envs.multiagent.text import last_integer
from miles_envs.registry.spec import EnvSpec

NAMESPACE = "pz"
ILLEGAL_MOVE_REWARD = -1.0
_FAMILIES = ("classic",)
_ENV_MODULE = re.compile(r"^\w+_v\d+\.py$")


def foreign_ids() -> list[str]:
    """PettingZoo env modules by dotted name under ``pettingzoo``, e.g. ``classic.tictactoe_v3``.

    Found by file name, without importing them (several need extras of their own, such as rlcard).
    """
    require("pettingzoo", "pettingzoo")
    ids = []
    for family in _FAMILIES:
        for entry in importlib.resources.files(f"pettingzoo.{family}").iterdir():
            if _ENV_MODULE.match(entry.name):
                ids.append(f"{family}.{entry.name[:-3]}")
    return sorted(ids)


def spec(foreign_id: str) -> EnvSpec:
    return foreign_spec(
        NAMESPACE, foreign_id, "miles_envs.integrations.foreign.pettingzoo:PettingZooTextEnv",
        description=f"PettingZoo {foreign_id} (AEC, text observations)", tags=["multi-agent", foreign_id.split(".")[0]],
    )


def board_text(planes: np.ndarray) -> str:
    """A ``[rows, cols, 2]`` own/opponent plane stack (tictactoe, connect four) as a grid of X, O and '.'."""
    rows = []
    for row in planes:
        rows.append(" ".join("X" if cell[0] else "O" if cell[1] else "." for cell in row))
    return "\n".join(rows)


def observation_text(observation: Any) -> str:
    array = np.asarray(observation)
    if array.ndim == 3 and array.shape[-1] == 2:
        return f"Board (X = yours, O = opponent's):\n{board_text(array)}"
    return f"Observation: {np.array2string(array, threshold=10_000, max_line_width=120)}"


class PettingZooTextEnv(MultiAgentEnv):
    """A PettingZoo AEC env (``env_id`` like ``classic.tictactoe_v3``); extra kwargs go to its ``env()``."""

    def __init__(self, env_id: str, max_turns: int | None = None, **env_kwargs: Any) -> None:
        require("pettingzoo", "pettingzoo")
        module = importlib.import_module(f"pettingzoo.{env_id}")
        self.env_id = env_id
        self._env = module.env(**env_kwargs)
        self.possible_agents = list(self._env.possible_agents)
        self.agents = []
        self.agent_selection = self.possible_agents[0]
        self.max_turns = max_turns

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        self._env.reset(seed=seed, options=options)
        self.agents = list(self._env.agents)
        self.agent_selection = self._env.agent_selection
        observations = {a: [] for a in self.possible_agents}
        observations[self.agent_selection] = self._prompt(self.agent_selection)
        return observations, {a: {} for a in self.possible_agents}

    def step(self, action: Message):
        mover, live = self.agent_selection, list(self.agents)
        move = last_integer(action.get("content"))
        if move is None or move not in self._legal_moves(mover):
            self.agents = []
            rewards = {a: (ILLEGAL_MOVE_REWARD if a == mover else 0.0) for a in live}
            note = {mover: [user(f"{action.get('content')!r} is not a legal move; the game is over.")]}
            return note, rewards, {a: True for a in live}, {a: False for a in live}, {mover: {"illegal_move": True}}
        self._env.step(move)
        rewards = {a: float(self._env.rewards.get(a, 0.0)) for a in live}
        self._step_done_agents()
        terminations = {a: bool(self._env.terminations.get(a, True)) for a in live}
        truncations = {a: bool(self._env.truncations.get(a, False)) and not terminations[a] for a in live}
        self.agents = [a for a in live if not (terminations[a] or truncations[a])]
        observations: dict[str, list[Message]] = {}
        if self.agents:
            self.agent_selection = self._env.agent_selection
            observations[self.agent_selection] = self._prompt(self.agent_selection)
        return observations, rewards, terminations, truncations, {}

    def _step_done_agents(self) -> None:
        env = self._env
        while env.agents and (env.terminations[env.agent_selection] or env.truncations[env.agent_selection]):
            env.step(None)

    def _legal_moves(self, agent: str) -> list[int]:
        observation = self._env.observe(agent)
        if isinstance(observation, dict) and "action_mask" in observation:
            return [int(i) for i in np.flatnonzero(observation["action_mask"])]
        return list(range(int(self._env.action_space(agent).n)))

    def _prompt(self, agent: str) -> list[Message]:
        observation = self._env.observe(agent)
        raw = observation["observation"] if isinstance(observation, dict) else observation
        legal = self._legal_moves(agent)
        return [user(f"You are {agent}.\n{observation_text(raw)}\nLegal moves: {legal}\nReply with the number of your move.")]

    def close(self) -> None:
        self._env.close()
        super().close()
