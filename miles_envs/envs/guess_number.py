"""``miles/GuessNumber-v0``: a multi-turn guessing game with a verifiable reward.

``miles/GuessNumber7-v0`` is the same game on 1..7 with 3 guesses; its prompt and feedback list
the numbers still possible, and its demonstrations open in the middle, then guess the lowest
number left (or, one time in two, a random one): a valid but weak strategy. Bisection wins every
game; its greedy imitation wins five in seven, so a warm start on the demonstrations leaves room
that only the reward can show the way to.
"""

from __future__ import annotations

import random
import re
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, system, user

_NUMBER = re.compile(r"-?\d+")
DEMO_STRATEGIES = ("bisect", "random", "scan", "mid_then_scan")


class GuessNumberEnv(Env):
    """Guess a secret integer in ``[low, high]``; after each guess the env says higher or lower.

    Reward = 0.9·correct + 0.1·format, where format is the fraction of replies holding a number.
    The game ends when the number is found or ``max_guesses`` guesses are spent.
    ``demo_strategy`` picks what :meth:`demonstration` teaches: ``bisect`` (optimal), ``random`` (a
    uniform guess among the numbers the feedback still allows), ``scan`` (the lowest of them, or
    one time in two a random one of them) or ``mid_then_scan`` (bisection's first guess, then
    ``scan``); the random draws are seeded by ``reset``'s seed.
    ``list_left`` lists the numbers still possible in the prompt and the feedback ("higher: 5 6 7"),
    for small ranges.
    """

    max_turns = 8
    run_inline = True

    def __init__(self, low: int = 1, high: int = 100, max_guesses: int = 7, demo_strategy: str = "bisect",
                 list_left: bool = False) -> None:
        if low >= high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if demo_strategy not in DEMO_STRATEGIES:
            raise ValueError(f"unknown demo_strategy {demo_strategy!r}: choose one of {', '.join(DEMO_STRATEGIES)}")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.demo_strategy, self.list_left = demo_strategy, list_left
        self.possible = (low, high)
        self.secret: int | None = None
        self.guesses = 0
        self.formatted = 0
        self._demo_rng = random.Random(0)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        rng = random.Random(seed)
        self.secret = rng.randint(self.low, self.high)
        self._demo_rng = random.Random(rng.random())
        self.guesses = self.formatted = 0
        self.possible = (self.low, self.high)
        numbers = f"one of {self._left()}" if self.list_left else f"from {self.low} to {self.high}"
        prompt = (
            f"Guess my integer, {numbers}, in {self.max_guesses} guesses. "
            "Reply with one number; I answer 'higher' or 'lower'."
        )
        return [system("Number guessing game."), user(prompt)], {}

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
            low, high = self.possible
            low, high = (max(low, guess + 1), high) if guess < self.secret else (low, min(high, guess - 1))
            self.possible = (low, high)
            reply = "higher" if guess < self.secret else "lower"
            if self.list_left:
                reply += f": {self._left()}"
        if over and not correct:
            reply += f" Out of guesses: the number was {self.secret}."
        components = {"correct": float(correct), "format": self.formatted / self.guesses}
        reward = 0.9 * components["correct"] + 0.1 * components["format"] if over else 0.0
        info = {"reward_components": components} if over else {}
        return [user(reply)], reward, over, False, info

    def _left(self) -> str:
        return " ".join(str(n) for n in range(self.possible[0], self.possible[1] + 1))

    def demonstration(self, history: list[Message]) -> Message:
        """The reply of ``demo_strategy`` given the conversation so far: a teacher for warm starts."""
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
        high = max(low, high)
        opening = not any(message["role"] == "assistant" for message in history)
        coin = self._demo_rng.random() if self.demo_strategy in ("scan", "mid_then_scan") else None  # one a turn
        if self.demo_strategy == "bisect" or (self.demo_strategy == "mid_then_scan" and opening):
            guess = (low + high) // 2
        elif coin is not None and coin < 0.5:
            guess = low
        else:
            guess = self._demo_rng.randint(low, high)
        return {"role": "assistant", "content": str(guess)}
