"""GuessNumber: feedback, reward, and the two demonstration strategies (bisection, random consistent)."""

import re

import pytest

from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.registry import make


def play(env: GuessNumberEnv, seed: int) -> tuple[float, list[dict]]:
    """One game where every reply is the env's own demonstration."""
    history, _ = env.reset(seed=seed)
    history = list(history)
    while True:
        action = env.demonstration(history)
        observation, reward, done, _, _ = env.step(action)
        history += [action, *observation]
        if done:
            return reward, history


def test_the_small_variant_lists_the_numbers_left():
    env = make("miles/GuessNumber7-v0")
    observation, _ = env.reset(seed=3)
    assert "one of 1 2 3 4 5 6 7, in 3 guesses" in observation[-1]["content"]
    secret = env.secret
    guess = 1 if secret > 1 else 7
    reply, reward, done, _, _ = env.step({"role": "assistant", "content": str(guess)})
    left = range(2, 8) if secret > 1 else range(1, 7)
    assert reply[0]["content"] == f"{'higher' if secret > 1 else 'lower'}: {' '.join(map(str, left))}"
    assert (reward, done) == (0.0, False)


def test_random_demonstrations_are_consistent_and_weaker_than_bisection():
    random_env, bisect_env = make("miles/GuessNumber7-v0"), GuessNumberEnv(1, 7, 3, demo_strategy="bisect")
    rewards = {"random": [], "bisect": []}
    for seed in range(400):
        reward, history = play(random_env, seed)
        rewards["random"].append(reward)
        # every random guess lies among the numbers the prompt or the last feedback lists
        left = list(range(1, 8))
        for message in history[2:]:
            if message["role"] == "assistant":
                assert int(message["content"]) in left
            elif message["content"].startswith(("higher: ", "lower: ")):
                left = [int(n) for n in re.match(r"(?:higher|lower): ([\d ]+)", message["content"]).group(1).split()]
                assert random_env.secret in left
        rewards["bisect"].append(play(bisect_env, seed)[0])
    assert all(r == pytest.approx(1.0) for r in rewards["bisect"])  # 3 halvings find any of 7
    mean = sum(rewards["random"]) / len(rewards["random"])
    assert 0.62 < mean < 0.80  # 0.9 x 0.678 + 0.1 in expectation
    assert [play(random_env, 5)[1] for _ in range(2)][0] == play(random_env, 5)[1]  # seeded


def test_unknown_demo_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown demo_strategy 'greedy'.*bisect, random"):
        GuessNumberEnv(demo_strategy="greedy")
