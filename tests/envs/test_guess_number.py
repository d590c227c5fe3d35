"""GuessNumber: feedback, reward, and the demonstration strategies (bisection and three weaker ones)."""

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


@pytest.mark.parametrize("strategy, low, high", [("random", 0.65, 0.77), ("scan", 0.55, 0.67), ("mid_then_scan", 0.72, 0.85)])
def test_weak_demonstrations_are_consistent_and_lose_to_bisection(strategy, low, high):
    # expected rewards: random 0.9 x 0.678 + 0.1 = 0.71; scan (lowest left, or one time in two random) 0.61;
    # mid_then_scan (4, then scan) 0.79
    weak, bisect = GuessNumberEnv(1, 7, 3, demo_strategy=strategy, list_left=True), GuessNumberEnv(1, 7, 3)
    rewards = []
    for seed in range(600):
        reward, history = play(weak, seed)
        rewards.append(reward)
        # every guess lies among the numbers the prompt or the last feedback lists
        left = list(range(1, 8))
        for message in history[2:]:
            if message["role"] == "assistant":
                assert int(message["content"]) in left
            elif message["content"].startswith(("higher: ", "lower: ")):
                left = [int(n) for n in re.match(r"(?:higher|lower): ([\d ]+)", message["content"]).group(1).split()]
                assert weak.secret in left
        assert play(bisect, seed)[0] == pytest.approx(1.0)  # 3 halvings find any of 7
    assert low < sum(rewards) / len(rewards) < high
    assert play(weak, 5)[1] == play(weak, 5)[1]  # seeded by reset


def test_mid_then_scan_opens_like_bisection_then_takes_the_lowest_left_or_a_random_one():
    env = make("miles/GuessNumber7-v0")
    seconds = []
    for seed in range(300):
        _, history = play(env, seed)
        guesses = [int(m["content"]) for m in history if m["role"] == "assistant"]
        assert guesses[0] == 4
        if env.secret != 4:
            seconds.append(guesses[1] in (1, 5))  # the lowest of "lower: 1 2 3" / "higher: 5 6 7"
    # the lowest one time in two, plus a random pick of three that lands on it: 2/3 of the second guesses
    assert 0.58 < sum(seconds) / len(seconds) < 0.75


def test_the_greedy_imitation_of_mid_then_scan_wins_five_secrets_in_seven():
    env = make("miles/GuessNumber7-v0")
    won = {}
    for seed in range(100):
        observation, _ = env.reset(seed=seed)
        guess, done = 4, False
        while not done:  # the demonstrations' most likely reply: 4, then the lowest number listed
            observation, reward, done, _, _ = env.step({"role": "assistant", "content": str(guess)})
            listed = re.findall(r"\d+", observation[0]["content"].split(":")[-1])
            guess = int(listed[0]) if listed else guess
        won[env.secret] = reward > 0.5
    assert sorted(s for s, w in won.items() if w) == [1, 2, 4, 5, 6] and len(won) == 7


def test_the_registered_variant_teaches_mid_then_scan():
    env = make("miles/GuessNumber7-v0")
    assert (env.low, env.high, env.max_guesses, env.demo_strategy, env.list_left) == (1, 7, 3, "mid_then_scan", True)


def test_unknown_demo_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown demo_strategy 'greedy'.*bisect, random, scan, mid_then_scan"):
        GuessNumberEnv(demo_strategy="greedy")
