"""``miles/Echo-v0``: repeat a phrase exactly; the smallest single-turn env."""

from __future__ import annotations

import random
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, user

_WORDS = ("red", "blue", "seven", "river", "quantum", "apple", "token", "north", "silent", "amber", "delta", "mile")


class EchoEnv(Env):
    """Reward 1.0 when the reply equals the phrase (surrounding whitespace ignored)."""

    max_turns = 1
    run_inline = True

    def __init__(self, words: int = 3) -> None:
        self.words = words
        self.phrase: str | None = None

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        rng = random.Random(seed)
        self.phrase = " ".join(rng.choice(_WORDS) for _ in range(self.words))
        return [user(f"Repeat exactly, with nothing else: {self.phrase}")], {}

    def step(self, action: Message) -> StepResult:
        if self.phrase is None:
            raise RuntimeError("step() before reset(): call reset() first")
        reward = float((action.get("content") or "").strip() == self.phrase)
        return [], reward, True, False, {"reward_components": {"exact": reward}}
