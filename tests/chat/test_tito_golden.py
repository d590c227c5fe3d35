"""Golden TITO tests on the real tokenizers: prompt + generated + deltas == the template's rendering."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.chat.conftest import TEMPLATE_KWARGS, renderer, tokenizer
from tests.chat.scenarios import SCENARIOS, TOOLS, roll

FAMILY = {"qwen3": "hermes", "qwen2_5": "hermes", "llama3": "llama3_json", "deepseek_v3": "deepseek_v3"}
CASES = [
    pytest.param(name, scenario, id=f"{name}-{scenario.name}")
    for name in FAMILY
    for scenario in SCENARIOS
    if FAMILY[name] in scenario.families and (not scenario.thinking or name == "qwen3")
    # Llama-3.2's template supports one call per turn
    and not (name == "llama3" and "calls:" in "".join(t.text for t in scenario.turns))
]


def template_ids(name: str, conversation: list[dict]) -> list[int]:
    """The reference: the chat template's rendering of the whole conversation, tokenised."""
    tok = tokenizer(name)
    if name == "deepseek_v3":  # apply_chat_template drops content=None and breaks this template; plain jinja2 works
        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(tok.chat_template).render(
            messages=conversation, tools=TOOLS, add_generation_prompt=True, bos_token=tok.bos_token
        )
        return tok.encode(text, add_special_tokens=False)
    return tok.apply_chat_template(
        conversation, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False, **TEMPLATE_KWARGS[name]
    )


def test_at_least_twenty_conversations():
    assert len(CASES) >= 20


@pytest.mark.parametrize(("name", "scenario"), CASES)
def test_stream_equals_template_rendering(name, scenario):
    rollout = roll(renderer(name), scenario, FAMILY[name])
    assert all(d.append_only for d in rollout.deltas), [d.note for d in rollout.deltas]
    assert rollout.ids == template_ids(name, rollout.conversation)


@pytest.mark.parametrize("name", list(FAMILY))
def test_prompt_ids_equal_apply_chat_template(name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there\n"}]
    for tools in (None, TOOLS):
        expected = template_ids(name, messages) if tools else None
        if tools is None and name != "deepseek_v3":
            expected = tokenizer(name).apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **TEMPLATE_KWARGS[name]
            )
        if expected is not None:
            assert renderer(name).prompt_ids(messages, tools) == expected


# -- literal ids: what each end-of-turn case appends after the generated ids --------------------
IM_END, IM_START, NL = 151645, 151644, 198
TOOL_OBS = [{"role": "tool", "content": "42"}]
QWEN2_5_TOOL_42 = [27, 14172, 9655, 397, 19, 17, 198, 522, 14172, 9655, 29]
HISTORY = [{"role": "user", "content": "Add 17 and 25."}]


def test_qwen2_5_delta_after_eos_is_newline_observation_header():
    r = renderer("qwen2_5")
    call = r.encode('<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>')
    delta = r.delta_ids(HISTORY, {"role": "assistant", "content": None}, call + [IM_END], "stop", TOOL_OBS)
    # \n <|im_start|>user \n < tool _response >\n 4 2 \n </ tool _response > <|im_end|> \n <|im_start|>assistant \n
    # (<tool_response> is plain text in Qwen2.5's vocabulary; Qwen3 made it a token)
    assert delta.ids == [NL, IM_START, 872, NL, *QWEN2_5_TOOL_42, IM_END, NL, IM_START, 77091, NL]
    assert delta.append_only and delta.note is None


def test_qwen2_5_delta_after_stop_string_adds_the_end_token():
    r = renderer("qwen2_5")
    call = r.encode('<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>')
    assert call[-1] == 151658  # the engine stopped on the stop string </tool_call>
    delta = r.delta_ids(HISTORY, {"role": "assistant", "content": None}, call, "stop", TOOL_OBS)
    assert delta.ids == [IM_END, NL, IM_START, 872, NL, *QWEN2_5_TOOL_42, IM_END, NL, IM_START, 77091, NL]
    assert delta.append_only


def test_length_cut_closes_the_turn_and_says_so():
    r = renderer("qwen3")
    cut = r.encode("The sum of seventeen and")[:3]
    delta = r.delta_ids(HISTORY, {"role": "assistant", "content": "The sum"}, cut, "length", [{"role": "user", "content": "Go on."}])
    assert delta.ids == [IM_END, NL, IM_START, 872, NL, 10850, 389, 13, IM_END, NL, IM_START, 77091, NL]
    assert delta.append_only and delta.note == "turn cut by length; closed with <|im_end|>"


def test_llama3_delta_literal_ids():
    r = renderer("llama3")
    call = r.encode('{"name": "add", "parameters": {"a": 17, "b": 25}}')
    delta = r.delta_ids(HISTORY, {"role": "assistant", "content": None}, call + [128009], "stop", TOOL_OBS, TOOLS)
    # <|start_header_id|>ipython<|end_header_id|> \n\n "42" <|eot_id|> <|start_header_id|>assistant<|end_header_id|> \n\n
    assert delta.ids == [128006, 23799, 4690, 128007, 271, 1, 2983, 1, 128009, 128006, 78191, 128007, 271]
    assert r.stop_token_ids == [128009, 128008, 128001]


def test_stop_token_ids_per_family():
    assert renderer("qwen3").stop_token_ids == [IM_END, 151643]
    assert renderer("qwen2_5").stop_token_ids == [IM_END, 151643]
    assert renderer("deepseek_v3").stop_token_ids == [1]
