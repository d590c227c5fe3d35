"""Hypothesis fuzz: whatever the text, a parser returns a well-formed action or raises ToolParseError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miles_envs.parsers import PARSERS, ParsedAction, ToolParseError, get_parser

# Pieces of every family's format, so generated text often gets deep into the parsers.
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<think>", "</think>", "<function=", "</function>", "<parameter=",
    "</parameter>", "<|python_tag|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "function", "```json\n", "\n```", "```", '{"name": "f", "arguments": ',
    '{"name": "f", "parameters": ', '{"name": ', '"arguments": ', "{", "}", "[", "]", '"', ":", ",", ";", "\n", ">",
    "1", "null", "[[[[[[[[[[", "\ud800", "名前", '{"a": 1}',
]
texts = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=30).map("".join),
)


def check_action(action: ParsedAction) -> None:
    assert isinstance(action, ParsedAction)
    assert action.content is None or isinstance(action.content, str)
    for call in action.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(call["function"]["name"], str) and call["function"]["name"]
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_arbitrary_text_raises_nothing_but_tool_parse_error(name, text):
    try:
        action = get_parser(name).parse(text)
    except ToolParseError as error:
        assert str(error)
        return
    check_action(action)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_deep_nesting_is_a_parse_error(name):
    deep = '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}"
    wrapped = {
        "hermes": f"<tool_call>{deep}</tool_call>",
        "qwen3_coder": f"<tool_call>\n<function=f>\n<parameter=a>\n{'[' * 100_000}\n</parameter>\n</function>\n</tool_call>",
        "deepseek_v3": f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{'[' * 100_000}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    }.get(name, deep)
    try:
        check_action(get_parser(name).parse(wrapped))
    except ToolParseError:
        pass
