"""GEM (``gem-llm``) envs: the text observation becomes a user message, the reply text is the action."""

from __future__ import annotations

from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, user
from miles_envs.integrations.foreign.common import PrivateGlobalRandom, foreign_spec, jsonable, require
from miles_envs.registry.spec import EnvSpec

NAMESPACE = "gem"


def _registry() -> dict[str, Any]:
    require("gem", "gem", "gem-llm")
    from gem.envs.registration import ENV_REGISTRY

    return ENV_REGISTRY


def foreign_ids() -> list[str]:
    return sorted(_registry())


def spec(foreign_id: str) -> EnvSpec:
    entry = _registry()[foreign_id]
    family = foreign_id.split(":", 1)[0]
    return foreign_spec(
        NAMESPACE, foreign_id, "miles_envs.integrations.foreign.gem:GemEnv",
        description=f"GEM {foreign_id} ({entry.entry_point})", tags=[family],
        max_turns=entry.kwargs.get("max_turns"),
    )


class GemEnv(Env):
    """A GEM env by its GEM id. Extra keyword arguments go to ``gem.make``.

    ``info["suffix"]`` (GEM's prompt for the next move) is appended to each non-final observation, as
    GEM's own observation wrappers do.
    """

    def __init__(self, env_id: str, max_turns: int | None = None, **env_kwargs: Any) -> None:
        gem = require("gem", "gem", "gem-llm")
        self.env_id = env_id
        self._random = PrivateGlobalRandom()
        with self._random.active():
            self._env = gem.make(env_id, **env_kwargs)
        self.max_turns = max_turns or getattr(self._env, "max_turns", None)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        with self._random.active():
            observation, info = self._env.reset(seed=seed)
        return [user(str(observation))], jsonable(info)

    def step(self, action: Message) -> StepResult:
        with self._random.active():
            observation, reward, terminated, truncated, info = self._env.step(action.get("content") or "")
        text = str(observation)
        if not (terminated or truncated) and info.get("suffix"):
            text = f"{text}\n{info['suffix']}"
        return [user(text)], float(reward), bool(terminated), bool(truncated), jsonable(info)
