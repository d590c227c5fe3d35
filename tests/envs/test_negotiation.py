import random

from miles_envs import assistant, check_env
from miles_envs.envs.negotiation import ITEMS, TOTAL_VALUE, NegotiationEnv, draw_values


def test_values_are_private_and_sum_to_ten():
    env = NegotiationEnv()
    obs, infos = env.reset(seed=3)
    for agent in env.possible_agents:
        assert sum(env.counts[i] * env.values[agent][i] for i in ITEMS) == TOTAL_VALUE
        (private,) = infos[agent]["private_view"]
        assert private in obs[agent][0]["content"]
        other = env.next_after(agent)
        assert infos[other]["private_view"][0] not in obs[agent][0]["content"] or env.values[agent] == env.values[other]


def test_accepting_a_proposal_pays_each_side_its_own_value():
    env = NegotiationEnv()
    env.reset(seed=3)
    counts, values = env.counts, env.values
    keep = {"book": counts["book"], "hat": 0, "ball": 0}
    obs, rewards, *_ = env.step(assistant("I like books. PROPOSE book=%d hat=0 ball=0" % counts["book"]))
    assert obs["bob"][0]["content"].startswith("alice: I like books.")
    assert f"you would get book=0 hat={counts['hat']} ball={counts['ball']}" in obs["bob"][0]["content"]
    _, rewards, terms, _, infos = env.step(assistant("ACCEPT"))
    alice = sum(keep[i] * values["alice"][i] for i in ITEMS) / TOTAL_VALUE
    bob = sum((counts[i] - keep[i]) * values["bob"][i] for i in ITEMS) / TOTAL_VALUE
    assert rewards == {"alice": alice, "bob": bob}
    assert all(terms.values()) and infos["bob"]["deal"]


def test_no_deal_within_the_message_limit_pays_nothing():
    env = NegotiationEnv(max_messages=2)
    env.reset(seed=0)
    env.step(assistant("hello"))
    _, rewards, terms, _, infos = env.step(assistant("ACCEPT"))  # nothing to accept yet
    assert rewards == {"alice": 0.0, "bob": 0.0} and all(terms.values()) and not infos["alice"]["deal"]


def test_a_proposal_beyond_the_pool_is_ignored():
    env = NegotiationEnv()
    env.reset(seed=0)
    env.step(assistant("PROPOSE book=99 hat=0 ball=0"))
    assert env.standing is None


def test_draw_values_is_deterministic_under_a_seed():
    counts = {"book": 2, "hat": 1, "ball": 3}
    assert draw_values(random.Random(5), counts) == draw_values(random.Random(5), counts)


def test_passes_the_multi_agent_checker():
    assert check_env(NegotiationEnv(), seed=3).ok
