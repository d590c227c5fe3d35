"""Tool-call parsers: exact parses per family, model-readable errors on malformed calls."""

from __future__ import annotations

import json

import pytest

from miles_envs.parsers import PARSERS, ParsedAction, ToolParseError, get_parser, parser_for
from miles_envs.tokenizers import load_tokenizer


def calls(action: ParsedAction) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in action.tool_calls]


# -- hermes -----------------------------------------------------------------------------------
def test_hermes_multiple_calls_content_and_reasoning():
    text = (
        "<think>\nadd then multiply\n</think>\n\nLet me compute.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "mul", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}\n</tool_call>'
    )
    action = get_parser("hermes").parse(text)
    assert action.reasoning == "add then multiply"
    assert action.content == "Let me compute."
    assert calls(action) == [("add", {"a": 1, "b": 2}), ("mul", {"a": 3, "b": 4})]
    first = action.tool_calls[0]
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert len({c["id"] for c in action.tool_calls}) == 2
    assert get_parser("hermes").parse(text).tool_calls == action.tool_calls  # ids are reproducible


def test_hermes_plain_answer_has_no_calls():
    action = get_parser("hermes").parse("The answer is 42.")
    assert action == ParsedAction(content="The answer is 42.", tool_calls=[], reasoning=None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', "not valid JSON"),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', "not closed with </tool_call>"),
        ('{"name": "add"}</tool_call>', "no opening <tool_call>"),
        ('<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', 'no "name" string'),
        ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', "must be a JSON object"),
        ('<tool_call>\n["add"]\n</tool_call>', "is a JSON list, not an object"),
        ('<tool_call>\n{"name": "add", "arguments": "{oops"}\n</tool_call>', "are not valid JSON"),
    ],
)
def test_hermes_malformed_calls_name_the_problem_and_the_format(text, problem):
    with pytest.raises(ToolParseError) as info:
        get_parser("hermes").parse(text)
    assert problem in str(info.value)
    assert "<tool_call>" in str(info.value)  # the expected format is spelled out for the model
    assert info.value.text == text


def test_as_message_keeps_reasoning_for_the_template():
    action = get_parser("hermes").parse('<think>r</think>x<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    message = action.as_message()
    assert message["role"] == "assistant" and message["content"] == "x"
    assert message["reasoning_content"] == "r" and message["tool_calls"] == action.tool_calls


def test_unclosed_think_is_all_reasoning():
    action = get_parser("hermes").parse("<think>\nstill thinking when the length limit hit")
    assert action == ParsedAction(content=None, tool_calls=[], reasoning="still thinking when the length limit hit")


# -- qwen3_coder ------------------------------------------------------------------------------
CODER_CALL = (
    "I will look it up.\n<tool_call>\n<function=search>\n<parameter=query>\nweather in Paris\n</parameter>\n"
    "<parameter=limit>\n3\n</parameter>\n<parameter=code>\ndef f():\n    return 1\n</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_without_schema_reads_json_values():
    action = get_parser("qwen3_coder").parse(CODER_CALL)
    assert action.content == "I will look it up."
    assert calls(action) == [("search", {"query": "weather in Paris", "limit": 3, "code": "def f():\n    return 1"})]


def test_qwen3_coder_schema_types_decide_conversion():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "string"}}},
            },
        }
    ]
    action = get_parser("qwen3_coder", tools=tools).parse(CODER_CALL)
    assert calls(action)[0][1]["limit"] == "3"
    bad = CODER_CALL.replace("search", "count").replace("\n3\n", "\nthree\n")
    tools[0]["function"]["name"] = "count"
    tools[0]["function"]["parameters"]["properties"]["limit"] = {"type": "integer"}
    with pytest.raises(ToolParseError, match="parameter 'limit' of count must be a JSON integer"):
        get_parser("qwen3_coder", tools=tools).parse(bad)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>", "exactly one <function=NAME>"),
        ("<tool_call>\n<function=f>\nstray\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>", "text outside"),
        ("<function=f>\n</function>", "must sit inside <tool_call>"),
        ("<tool_call>\n<function=>\n</function>\n</tool_call>", "empty function name"),
        ("<tool_call>\n<function=f>\n</function>", "not closed"),
    ],
)
def test_qwen3_coder_malformed(text, problem):
    with pytest.raises(ToolParseError, match=problem):
        get_parser("qwen3_coder").parse(text)


# -- llama3_json ------------------------------------------------------------------------------
def test_llama3_single_and_multiple_calls():
    parser = get_parser("llama3_json")
    assert calls(parser.parse('{"name": "add", "parameters": {"a": 1, "b": 2}}')) == [("add", {"a": 1, "b": 2})]
    action = parser.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": [1]}}')
    assert action.content is None and calls(action) == [("a", {}), ("b", {"x": [1]})]
    assert parser.parse("Paris is the capital.") == ParsedAction("Paris is the capital.", [], None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "add", "parameters": {"a": 1}', "not valid JSON"),
        ('{"name": 3, "parameters": {}}', 'no "name" string'),
        ("<|python_tag|>", "empty"),
        ('{"name": "a", "parameters": {}} trailing words', "tool call 2 is not valid JSON"),
    ],
)
def test_llama3_malformed(text, problem):
    with pytest.raises(ToolParseError, match=problem):
        get_parser("llama3_json").parse(text)


# -- deepseek_v3 ------------------------------------------------------------------------------
def ds_call(name: str, args: str) -> str:
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"


def test_deepseek_v3_calls():
    text = "Checking.<｜tool▁calls▁begin｜>" + ds_call("add", '{"a": 1}') + "\n" + ds_call("neg", '{"x": 2}') + "<｜tool▁calls▁end｜>"
    action = get_parser("deepseek_v3").parse(text)
    assert action.content == "Checking." and calls(action) == [("add", {"a": 1}), ("neg", {"x": 2})]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<｜tool▁calls▁begin｜>" + ds_call("add", '{"a": 1}'), "not closed"),
        ("<｜tool▁calls▁begin｜>" + ds_call("add", "{a: 1}") + "<｜tool▁calls▁end｜>", "not valid JSON"),
        ("<｜tool▁calls▁begin｜>garbage<｜tool▁calls▁end｜>", "cannot read"),
        ("<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>", "holds no call"),
        (ds_call("add", "{}"), "without <｜tool▁calls▁begin｜>"),
    ],
)
def test_deepseek_v3_malformed(text, problem):
    with pytest.raises(ToolParseError, match=problem):
        get_parser("deepseek_v3").parse(text)


# -- json fallback ----------------------------------------------------------------------------
def test_json_fallback_bare_fenced_and_list():
    parser = get_parser("json")
    assert calls(parser.parse('{"name": "f", "arguments": {"a": 1}}')) == [("f", {"a": 1})]
    action = parser.parse('Sure:\n```json\n[{"name": "f", "arguments": {}}, {"name": "g", "parameters": {"b": 2}}]\n```')
    assert action.content == "Sure:" and calls(action) == [("f", {}), ("g", {"b": 2})]
    assert parser.parse('Here is data:\n```json\n{"x": 1}\n```').tool_calls == []
    with pytest.raises(ToolParseError, match="not valid JSON"):
        parser.parse('{"name": "f", "arguments": {')


# -- lookup -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokenizer", "parser"), [("qwen3", "hermes"), ("qwen2_5", "hermes"), ("llama3", "llama3_json"), ("deepseek_v3", "deepseek_v3")]
)
def test_parser_for_real_tokenizers(tokenizer, parser):
    assert parser_for(load_tokenizer(tokenizer)).name == parser


def test_parser_for_names_and_unknown():
    assert parser_for("Qwen/Qwen3-Coder-30B-A3B-Instruct").name == "qwen3_coder"
    assert parser_for("meta-llama/Llama-3.2-1B-Instruct").name == "llama3_json"
    assert parser_for("some/unknown-model").name == "json"
    assert parser_for("deepseek_v3").name == "deepseek_v3"
    with pytest.raises(ValueError, match="choose one of hermes"):
        get_parser("nope")
    assert set(PARSERS) == {"hermes", "qwen3_coder", "llama3_json", "deepseek_v3", "json"}
