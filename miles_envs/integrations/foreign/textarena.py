"""TextArena envs: single-player games as ``Env``, multi-player games as ``MultiAgentEnv``.

The adapter drives TextArena's ``-raw`` variant (no observation wrappers), because the chat history
is the loop's job: each turn delivers only the game messages that are new to the player, and the
player's own action echoes are dropped (the player's stream already holds its reply). The number of
players is the smallest the game accepts unless ``num_players`` says otherwise.
"""

from __future__ import annotations

from typing import Any

from miles_envs.env import Env, Message, MultiAgentEnv, ResetResult, StepResult, user
from miles_envs.integrations.foreign.common import PrivateGlobalRandom, foreign_spec, jsonable, require
from miles_envs.registry.spec import EnvSpec

NAMESPACE = "textarena"
_VARIANTS = ("-raw", "-train")
_MAX_PLAYERS = 8


def _registry() -> dict[str, Any]:
    require("textarena", "textarena")
    from textarena.envs.registration import ENV_REGISTRY

    return ENV_REGISTRY


def foreign_ids() -> list[str]:
    return sorted(i for i in _registry() if not i.endswith(_VARIANTS))


def spec(foreign_id: str) -> EnvSpec:
    entry = _registry()[foreign_id]
    return foreign_spec(
        NAMESPACE, foreign_id, "miles_envs.integrations.foreign.textarena:make_textarena_env",
        description=f"TextArena {foreign_id} ({entry.entry_point})", tags=["game"],
    )


def make_textarena_env(env_id: str, num_players: int | None = None, max_turns: int | None = None, **env_kwargs: Any) -> Env:
    """The adapter for ``env_id``: ``TextArenaEnv`` for one player, ``TextArenaMultiAgentEnv`` otherwise."""
    game = _Game(env_id, env_kwargs)
    players = num_players or game.smallest_player_count()
    cls = TextArenaEnv if players == 1 else TextArenaMultiAgentEnv
    env = cls(game, players)
    env.max_turns = max_turns
    return env


class _Game:
    """One TextArena env instance with its own global-RNG stream."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]) -> None:
        ta = require("textarena", "textarena")
        self.env_id = env_id
        self.random = PrivateGlobalRandom()
        with self.random.active():
            self.env = ta.make(f"{env_id}-raw", **env_kwargs)

    def smallest_player_count(self) -> int:
        for players in range(1, _MAX_PLAYERS + 1):
            try:
                self.reset(players, seed=0)
            except (AssertionError, ValueError, KeyError, IndexError):
                continue
            return players
        raise ValueError(f"{self.env_id}: no player count in 1..{_MAX_PLAYERS} is accepted; pass num_players")

    def reset(self, players: int, seed: int | None) -> None:
        with self.random.active():
            self.env.reset(num_players=players, seed=seed)

    def step(self, text: str) -> tuple[bool, dict[str, Any]]:
        with self.random.active():
            return self.env.step(text)

    def observe(self) -> tuple[int, list[Message]]:
        """The current player and the game messages that are new to it, as one user message."""
        player, messages = self.env.get_observation()
        return player, _as_user_message(player, messages)

    def outcome(self) -> tuple[dict[int, float], dict[str, Any]]:
        result = self.env.close()
        rewards, game_info = result if isinstance(result, tuple) else (result, {})
        return {int(p): float(r) for p, r in (rewards or {}).items()}, jsonable({str(k): v for k, v in (game_info or {}).items()})


def _as_user_message(player: int, messages: list[tuple[int, str, Any]]) -> list[Message]:
    from textarena import GAME_ID, ObservationType

    lines = []
    for sender, text, kind in messages:
        if kind == ObservationType.PLAYER_ACTION and sender == player:
            continue
        lines.append(text if sender == GAME_ID or kind != ObservationType.PLAYER_ACTION else f"[Player {sender}] {text}")
    return [user("\n".join(lines))] if lines else []


class TextArenaEnv(Env):
    """A single-player TextArena game; the reward is the game's final reward for player 0."""

    def __init__(self, game: _Game, players: int = 1) -> None:
        self._game = game

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        self._game.reset(1, seed)
        _, observation = self._game.observe()
        return observation, {}

    def step(self, action: Message) -> StepResult:
        done, info = self._game.step(action.get("content") or "")
        _, observation = self._game.observe()
        if not done:
            return observation, 0.0, False, False, jsonable(info or {})
        rewards, game_info = self._game.outcome()
        return observation, rewards.get(0, 0.0), True, False, {**jsonable(info or {}), "game_info": game_info}


class TextArenaMultiAgentEnv(MultiAgentEnv):
    """A multi-player TextArena game; agents are ``player_0`` … and rewards come when the game ends."""

    def __init__(self, game: _Game, players: int) -> None:
        self._game = game
        self.possible_agents = [f"player_{i}" for i in range(players)]
        self.agents = []
        self.agent_selection = self.possible_agents[0]

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        self._game.reset(len(self.possible_agents), seed)
        self.agents = list(self.possible_agents)
        observations = self._observe_next()
        return {a: observations.get(a, []) for a in self.possible_agents}, {a: {} for a in self.possible_agents}

    def step(self, action: Message):
        done, info = self._game.step(action.get("content") or "")
        live = list(self.agents)
        if not done:
            observations = self._observe_next()
            return observations, {a: 0.0 for a in live}, {a: False for a in live}, {a: False for a in live}, {
                self.agent_selection: jsonable(info or {})
            }
        rewards, game_info = self._game.outcome()
        self.agents = []
        return (
            {},
            {a: rewards.get(int(a.rsplit("_", 1)[1]), 0.0) for a in live},
            {a: True for a in live},
            {a: False for a in live},
            {a: {"game_info": game_info} for a in live},
        )

    def _observe_next(self) -> dict[str, list[Message]]:
        player, observation = self._game.observe()
        self.agent_selection = f"player_{player}"
        return {self.agent_selection: observation}
