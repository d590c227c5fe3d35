"""The OpenAI-compatible session endpoint, driven by the real ``openai`` client over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import openai
import pytest

from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.sglang import SGLangEngine
from miles_envs.chat import ChatRenderer
from miles_envs.integrations.session_server import create_app
from miles_envs.parsers import parser_for
from miles_envs.serving import HTTPServer
from miles_envs.tokenizers import load_tokenizer

TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
REPLIES = [TOOL_CALL, "2 + 3 = 5.", "4 + 4 = 8.", "Hello again."]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
}}]


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    with HTTPServer(app, lifespan=True).running_in_thread() as server:
        yield server.url


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen2_5")


@pytest.fixture
def endpoint(tokenizer):
    renderer = ChatRenderer(tokenizer)
    backend = ProtocolServer(ScriptedEngine(tokenizer, REPLIES))
    with backend.running_in_thread():
        app = create_app(lambda: SGLangEngine(backend.url), renderer, parser_for(tokenizer))
        with serve(app) as url:
            yield url, backend


def generate_requests(backend: ProtocolServer) -> list[list[int]]:
    return [r["input_ids"] for r in backend.requests if "input_ids" in r]


def test_multi_turn_session_records_the_engines_ids(endpoint, tokenizer):
    url, backend = endpoint
    client = openai.OpenAI(base_url=f"{url}/sessions/s1/v1", api_key="unused")
    messages = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]

    first = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    messages += [first.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    second = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "2 + 3 = 5."
    messages += [{"role": "assistant", "content": second.choices[0].message.content}, {"role": "user", "content": "And 4 + 4?"}]
    third = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
    assert third.choices[0].message.content == "4 + 4 = 8."

    record = client.get(f"{url}/sessions/s1", cast_to=object)
    assert record["drift"] == [] and len(record["segments"]) == 1
    segment = record["segments"][0]
    tokens = segment["prompt_ids"] + segment["response_ids"]
    requests = generate_requests(backend)
    assert len(requests) == 3
    replies = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in REPLIES[:3]]
    # each engine call saw a prefix of the recorded stream, and the stream is the last call's input + reply
    for input_ids in requests:
        assert tokens[: len(input_ids)] == input_ids
    assert tokens == requests[-1] + replies[-1]
    # model spans are exactly the engine's ids (mask 1); everything between is env tokens (mask 0)
    model_turns = [t for t in segment["turns"] if t["kind"] == "model"]
    assert [segment["response_ids"][t["start"] : t["end"]] for t in model_turns] == replies
    assert sum(segment["loss_mask"]) == sum(map(len, replies))
    assert third.usage.prompt_tokens == len(requests[-1])
    # only the suffix was re-tokenised: the template agrees on this append-only conversation
    assert "non_append_only_template" not in segment["flags"]


def test_edited_history_is_flagged_as_drift(endpoint):
    url, backend = endpoint
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers={"X-Session-Id": "s2"})
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS).choices[0].message
    edited = [{"role": "user", "content": "What is 2 + 4?"}, reply.model_dump(), {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "6"}]
    client.chat.completions.create(model="policy", messages=edited, tools=TOOLS)

    record = client.get(f"{url}/sessions/s2", cast_to=object)
    assert len(record["segments"]) == 2
    assert record["segments"][0]["flags"] == ["drift"]
    assert record["drift"] == ["segment 0: message 0 differs from the recorded conversation"]
    requests = generate_requests(backend)
    second = record["segments"][1]
    assert second["prompt_ids"] == requests[-1]  # the new segment starts from the full conversation


def test_streaming_is_refused_with_a_reason(endpoint):
    url, _ = endpoint
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}], stream=True)
