"""``miles/Echo-v0``: repeat a phrase exactly; the smallest single-turn env."""

from __future__ import annotations

import random
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, assistant, user

_WORDS = ("red", "blue", "seven", "river", "quantum", "apple", "token", "north", "silent", "amber", "delta", "mile")


class EchoEnv(Env):
    """Reward: the share of the phrase's words the reply has in place, over the longer of the two
    word counts (extra words cost); 1.0 exactly when the reply equals the phrase (surrounding
    whitespace ignored). The partial credit gives RL a signal before the first exact copy."""

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
        reply = (action.get("content") or "").strip()
        expected, given = self.phrase.split(), reply.split()
        in_place = sum(a == b for a, b in zip(expected, given)) / max(len(expected), len(given))
        exact = float(reply == self.phrase)
        return [], max(in_place, exact), True, False, {"reward_components": {"exact": exact, "words_in_place": in_place}}

    def demonstration(self, history: list[Message]) -> Message:
        """The correct reply: the phrase itself (a teacher for supervised warm starts)."""
        if self.phrase is None:
            raise RuntimeError("demonstration() before reset(): call reset() first")
        return assistant(self.phrase)
