"""The observation-delta cache changes speed, never ids."""

import copy
import warnings

import pytest

from miles_envs.chat import ChatRenderer
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer
from tests.chat.scenarios import SCENARIOS, roll
from tests.chat.test_tito_golden import CASES, FAMILY


@pytest.mark.parametrize("name", list(FAMILY))
def test_cached_streams_equal_uncached_over_every_scenario_twice(name):
    cached = ChatRenderer(tokenizer(name), TEMPLATE_KWARGS[name])
    exact = ChatRenderer(tokenizer(name), TEMPLATE_KWARGS[name], cache_deltas=False)
    scenarios = [scenario for case_name, scenario in (c.values for c in CASES) if case_name == name]
    for _ in range(2):
        for scenario in scenarios:
            fast, slow = roll(cached, scenario, FAMILY[name]), roll(exact, scenario, FAMILY[name])
            assert fast.ids == slow.ids, scenario.name
            assert [d.append_only for d in fast.deltas] == [d.append_only for d in slow.deltas]
    assert exact.delta_cache.hits == 0
    if name == "deepseek_v3":  # renders a tool output differently once an earlier one exists: probed off
        assert not cached.delta_cache.enabled and cached.delta_cache.hits == 0
    else:
        assert cached.delta_cache.enabled and cached.delta_cache.hits > len(scenarios)


def test_a_template_that_defeats_the_probe_is_caught_by_verification():
    tok = copy.copy(tokenizer("qwen2_5"))
    # numbers user turns only once the conversation is long: the probe's short histories look local
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'user' and messages|length > 9 %}[{{ loop.index }}] {% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tok)
    renderer.delta_cache.verify_every = 2
    assert renderer.delta_cache.enabled
    exact = ChatRenderer(tok, cache_deltas=False)
    scenario = next(s for s in SCENARIOS if s.name == "follow_up_user_turn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            roll(renderer, scenario, "hermes")
            if not renderer.delta_cache.enabled:
                break
    assert not renderer.delta_cache.enabled
    assert any("delta cache turned off" in str(w.message) for w in caught)
    assert roll(renderer, scenario, "hermes").ids == roll(exact, scenario, "hermes").ids
