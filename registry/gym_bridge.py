"""Every registered env reachable through ``gymnasium.make``.

``gymnasium.make("miles_envs.gym:demo/My-v0")`` imports ``miles_envs.gym`` (which copies all specs
into Gymnasium's registry under the same ids) and makes the env wrapped as a ``gymnasium.Env`` with
``Text`` spaces: the action is the assistant's text; the observation is the new messages' text, with
the messages themselves in ``info["messages"]``.
"""

from __future__ import annotations

from typing import Any

import gymnasium
from gymnasium import spaces

from miles_envs.env import Env, assistant

MAX_TEXT = 1 << 20
# Text spaces check membership per character: cover the Basic Multilingual Plane (no surrogates).
_CHARSET = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF)


class GymnasiumEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, env_id: str, **kwargs: Any) -> None:
        from miles_envs.registry.core import make

        self.inner: Env = make(env_id, **kwargs)
        self.observation_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=_CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=_CHARSET)

    @staticmethod
    def _text(messages: list[dict[str, Any]]) -> str:
        return "\n".join(m.get("content") or "" for m in messages)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, info = self.inner.reset(seed=seed, options=options)
        return self._text(obs), {**info, "messages": obs}

    def step(self, action: str):
        obs, reward, terminated, truncated, info = self.inner.step(assistant(action))
        return self._text(obs), float(reward), terminated, truncated, {**info, "messages": obs}

    def close(self) -> None:
        self.inner.close()


def register_all() -> int:
    """Copy every miles-envs spec into Gymnasium's registry; returns how many were added."""
    from miles_envs.registry.core import list_specs

    added = 0
    for spec in list_specs():
        if spec.id in gymnasium.registry:
            continue
        gymnasium.register(
            id=spec.id,
            entry_point="miles_envs.registry.gym_bridge:GymnasiumEnv",
            kwargs={"env_id": spec.id},
            disable_env_checker=True,
        )
        added += 1
    return added
