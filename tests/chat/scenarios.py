"""Scripted multi-turn tool conversations for golden TITO tests.

A scenario is a list of model turns. Each turn is the text the model writes and how generation ends:
``eos`` (the model writes its end-of-turn token), ``stop`` (the engine stops on a stop string the
text ends with; no end token), or ``length:N`` (cut after N tokens). Generated ids are built the way
a model produces them: the tokenisation of the text, plus the end token for ``eos``. The env answers
each parsed call with a tool result, a malformed call with the parse error as a tool message, and a
plain answer with the next user question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from miles_envs.chat import ChatRenderer
from miles_envs.parsers import ToolParseError, parser_for

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find a city's population.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
INITIAL = [
    {"role": "system", "content": "You are a careful assistant. Use the tools."},
    {"role": "user", "content": "What is 17 + 25, and how many people live in Zürich?"},
]
FOLLOW_UP = "Thanks. Now add 1 and 2."


def call_text(family: str, calls: list[tuple[str, dict]]) -> str:
    """Tool calls in the family's own output format."""
    if family == "hermes":
        return "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in calls)
    if family == "llama3_json":
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    body = "\n".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{json.dumps(a)}\n```<｜tool▁call▁end｜>" for n, a in calls
    )
    return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


def malformed_text(family: str) -> str:
    return {
        "hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25,}}\n</tool_call>',
        "llama3_json": '{"name": "add", "parameters": {"a": 17, "b": 25',
        "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n{a: 17}\n```<｜tool▁call▁end｜>",
    }[family]


ADD = ("add", {"a": 17, "b": 25})
LOOKUP = ("lookup", {"city": "Zürich"})
RESULTS = {"add": "42", "lookup": '{"city": "Zürich", "population": 421878}'}


@dataclass
class Turn:
    text: str  # may use {call:add}, {call:lookup}, {calls:add+lookup}, {malformed}
    end: str = "eos"


@dataclass
class Scenario:
    name: str
    turns: list[Turn]
    families: tuple[str, ...] = ("hermes", "llama3_json", "deepseek_v3")
    thinking: bool = False  # Qwen3 writes <think> blocks

    def text(self, turn: Turn, family: str) -> str:
        out = turn.text.replace("{malformed}", malformed_text(family))
        for key, calls in (("{call:add}", [ADD]), ("{call:lookup}", [LOOKUP]), ("{calls:add+lookup}", [ADD, LOOKUP])):
            out = out.replace(key, call_text(family, calls))
        return out


SCENARIOS = [
    Scenario("one_call_then_answer", [Turn("{call:add}"), Turn("17 + 25 = 42.")]),
    Scenario("two_calls_one_turn", [Turn("{calls:add+lookup}"), Turn("42, and Zürich has 421878 people.")], families=("hermes", "deepseek_v3")),
    Scenario("sequential_calls", [Turn("{call:add}"), Turn("{call:lookup}"), Turn("Done: 42 and 421878.")]),
    Scenario("malformed_then_fixed", [Turn("{malformed}"), Turn("{call:add}"), Turn("It is 42.")]),
    Scenario("stop_string_on_call", [Turn("{call:add}", end="stop"), Turn("{call:lookup}", end="stop"), Turn("42; 421878.")], families=("hermes",)),
    Scenario("stop_string_on_answer", [Turn("{call:add}"), Turn("The answer is <answer>42</answer>", end="stop")]),
    Scenario("length_cut_mid_call", [Turn("{call:lookup}", end="length:9"), Turn("{call:lookup}"), Turn("421878 people.")]),
    Scenario("length_cut_answer", [Turn("{call:add}"), Turn("The sum of seventeen and twenty-five is forty-two, as the tool said.", end="length:6")]),
    Scenario("content_before_call", [Turn("Let me add the numbers first.\n{call:add}"), Turn("Now the city.\n{call:lookup}"), Turn("42 and 421878.")], families=("hermes", "deepseek_v3")),
    Scenario("follow_up_user_turn", [Turn("{call:add}"), Turn("It is 42."), Turn("{call:add}"), Turn("3.")]),
    Scenario("empty_turn", [Turn(""), Turn("{call:add}"), Turn("42.")], families=("hermes",)),
    # ends on a call: a new user question would make Qwen3 drop the think blocks (tested on its own)
    Scenario("thinking_tool_loop", [Turn("<think>\nI need the sum.\n</think>\n\n{call:add}"), Turn("<think>\nNow the city.\n</think>\n\n{call:lookup}", end="stop")], families=("hermes",), thinking=True),
]


def generated_ids(renderer: ChatRenderer, text: str, end: str) -> tuple[list[int], str]:
    ids = renderer.encode(text)
    if end == "eos":
        return ids + [renderer.turn_end_id], "stop"
    if end == "stop":
        return ids, "stop"
    return ids[: int(end.split(":")[1])], "length"


@dataclass
class Rollout:
    ids: list[int]
    conversation: list[dict]  # assistant turns as their generated text, as the template should see them
    deltas: list = field(default_factory=list)


def env_reply(parser, text: str) -> tuple[dict, list[dict]]:
    """The action the env receives and its observation: tool results, a parse error, or a new question."""
    try:
        action = parser.parse(text)
    except ToolParseError as error:
        return {"role": "assistant", "content": text}, [{"role": "tool", "content": f"Error: {error}"}]
    results = [
        {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": RESULTS[c["function"]["name"]]}
        for c in action.tool_calls
    ]
    return action.as_message(), results or [{"role": "user", "content": FOLLOW_UP}]


def roll(renderer: ChatRenderer, scenario: Scenario, family: str) -> Rollout:
    """Drive the renderer exactly as the env loop does; return the token stream and the conversation."""
    parser = parser_for(family)
    history = [dict(m) for m in INITIAL]
    rollout = Rollout(ids=renderer.prompt_ids(history, TOOLS), conversation=[dict(m) for m in INITIAL])
    for turn in scenario.turns:
        generated, finish = generated_ids(renderer, scenario.text(turn, family), turn.end)
        text = renderer.decode(generated[:-1] if turn.end == "eos" else generated)
        message, observation = env_reply(parser, text)
        delta = renderer.delta_ids(history, message, generated, finish, observation, TOOLS)
        rollout.deltas.append(delta)
        rollout.ids += generated + delta.ids
        history += [message, *observation]
        rollout.conversation += [{"role": "assistant", "content": text}, *observation]
    return rollout
