"""``miles/GuessNumber-v0``: a multi-turn guessing game with a verifiable reward."""

from __future__ import annotations

import random
import re
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, system, user

_NUMBER = re.compile(r"-?\d+")


class GuessNumberEnv(Env):
    """Guess a secret integer in ``[low, high]``; after each guess the env says higher or lower.

    Reward = 0.9·correct + 0.1·format, where format is the fraction of replies holding a number.
    The game ends when the number is found or ``max_guesses`` guesses are spent.
    """

    max_turns = 8
    run_inline = True

    def __init__(self, low: int = 1, high: int = 100, max_guesses: int = 7) -> None:
        if low >= high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.secret: int | None = None
        self.guesses = 0
        self.formatted = 0

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        rng = random.Random(seed)
        self.secret = rng.randint(self.low, self.high)
        self.guesses = self.formatted = 0
        prompt = (
            f"I am thinking of an integer between {self.low} and {self.high}. You have {self.max_guesses} "
            "guesses. Reply with one number per turn; I will say 'higher' or 'lower'."
        )
        return [system("You are playing a number guessing game."), user(prompt)], {}

    def step(self, action: Message) -> StepResult:
        if self.secret is None:
            raise RuntimeError("step() before reset(): call reset() first")
        self.guesses += 1
        numbers = _NUMBER.findall(action.get("content") or "")
        guess = int(numbers[-1]) if numbers else None
        self.formatted += guess is not None
        correct = guess == self.secret
        over = correct or self.guesses >= self.max_guesses
        if correct:
            reply = f"Correct! The number was {self.secret}."
        elif guess is None:
            reply = "I could not find a number in your reply. Reply with a single integer."
        else:
            reply = "higher" if guess < self.secret else "lower"
        if over and not correct:
            reply += f" Out of guesses: the number was {self.secret}."
        components = {"correct": float(correct), "format": self.formatted / self.guesses}
        reward = 0.9 * components["correct"] + 0.1 * components["format"] if over else 0.0
        info = {"reward_components": components} if over else {}
        return [user(reply)], reward, over, False, info

    def demonstration(self, history: list[Message]) -> Message:
        """The optimal (binary search) reply given the conversation so far: a teacher for warm starts."""
        low, high = self.low, self.high
        last_guess = None
        for message in history:
            content = message.get("content") or ""
            if message["role"] == "assistant":
                found = _NUMBER.findall(content)
                last_guess = int(found[-1]) if found else None
            elif last_guess is not None and content.startswith("higher"):
                low = last_guess + 1
            elif last_guess is not None and content.startswith("lower"):
                high = last_guess - 1
        return {"role": "assistant", "content": str((low + high) // 2)}
