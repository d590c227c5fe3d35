"""Templates that re-render earlier text: detected, flagged, exact ids kept, delta still placed."""

from __future__ import annotations

import copy

import pytest

from miles_envs.chat import ChatRenderer, ChatRenderError
from miles_envs.parsers import get_parser
from tests.chat.conftest import renderer, tokenizer
from tests.chat.scenarios import INITIAL, TOOLS

THINK_ANSWER = "<think>\nThe tool said 42.\n</think>\n\nIt is 42."
QUESTION = [{"role": "user", "content": "And 1 + 2?"}]
NEXT_USER_TURN = "<|im_end|>\n<|im_start|>user\nAnd 1 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_new_question_drops_earlier_think_and_is_flagged():
    r = renderer("qwen3")
    generated = r.encode(THINK_ANSWER) + [r.turn_end_id]
    message = get_parser("hermes").parse(THINK_ANSWER).as_message()
    delta = r.delta_ids(INITIAL, message, generated, "stop", QUESTION, TOOLS)
    assert not delta.append_only
    assert "re-renders earlier text" in delta.note and "<think>" in delta.note
    # the delta is still what the template writes after the turn; the model's <|im_end|> is not repeated
    assert r.decode(delta.ids) == NEXT_USER_TURN[len("<|im_end|>") :]
    # and the template's full rendering really differs from the kept stream
    stream = r.prompt_ids(INITIAL, TOOLS) + generated + delta.ids
    full = tokenizer("qwen3").apply_chat_template(
        [*INITIAL, {"role": "assistant", "content": THINK_ANSWER}, *QUESTION],
        tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    assert stream != full and r.decode(full).count("<think>") == 0


def test_qwen3_think_inside_a_tool_loop_stays_append_only():
    r = renderer("qwen3")
    text = '<think>\nAdd them.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>'
    message = get_parser("hermes").parse(text).as_message()
    delta = r.delta_ids(INITIAL, message, r.encode(text) + [r.turn_end_id], "stop", [{"role": "tool", "content": "42"}], TOOLS)
    assert delta.append_only and delta.note is None


def test_qwen3_enable_thinking_false_is_not_append_only():
    r = renderer("qwen3", enable_thinking=False)
    prompt = r.prompt_ids(INITIAL)
    assert r.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    delta = r.delta_ids(INITIAL, {"role": "assistant", "content": "Hi."}, r.encode("Hi.") + [r.turn_end_id], "stop", QUESTION)
    assert not delta.append_only and "re-renders earlier text" in delta.note
    assert r.decode(delta.ids) == "\n<|im_start|>user\nAnd 1 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_earlier_turns_render_from_their_generated_text():
    """The think block lives only in the generated text; the renderer remembers it by message object."""
    r = ChatRenderer(tokenizer("qwen3"))
    call = '<think>\nFirst add.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>'
    message = {"role": "assistant", "content": None, "tool_calls": get_parser("hermes").parse(call).tool_calls}
    r.delta_ids(INITIAL, message, r.encode(call) + [r.turn_end_id], "stop", [{"role": "tool", "content": "42"}], TOOLS)
    history = [*INITIAL, message, {"role": "tool", "content": "42"}]
    answer = r.encode("It is 42.") + [r.turn_end_id]
    answer_message = {"role": "assistant", "content": "It is 42."}
    assert not r.delta_ids(history, answer_message, answer, "stop", QUESTION, TOOLS).append_only
    # a copy of the message is unknown to the renderer: rendered as given, it carries no reasoning to drop
    copied = [*INITIAL, dict(message), {"role": "tool", "content": "42"}]
    assert r.delta_ids(copied, dict(answer_message), answer, "stop", QUESTION, TOOLS).append_only


def test_remembered_turns_are_bounded():
    r = ChatRenderer(tokenizer("qwen2_5"), remember=2)
    messages = [{"role": "assistant", "content": str(i)} for i in range(3)]
    for m in messages:
        r.delta_ids(INITIAL, m, r.encode(m["content"]) + [r.turn_end_id], "stop", QUESTION)
    assert [id(seen.message) for seen in r._seen.values()] == [id(messages[1]), id(messages[2])]


def test_model_end_token_other_than_the_templates_is_flagged():
    r = renderer("llama3")
    call = r.encode('{"name": "add", "parameters": {"a": 17, "b": 25}}')
    delta = r.delta_ids(INITIAL, {"role": "assistant", "content": None}, call + [128008], "stop", [{"role": "tool", "content": "42"}], TOOLS)
    assert not delta.append_only
    assert delta.note == "the model ended its turn with <|eom_id|>, the template writes <|eot_id|>"
    assert delta.ids[0] == 128006  # the template's <|eot_id|> is not added after the model's <|eom_id|>


def test_qwen_endoftext_instead_of_im_end_is_flagged():
    r = renderer("qwen2_5")
    delta = r.delta_ids(INITIAL, {"role": "assistant", "content": "42"}, r.encode("42") + [151643], "stop", QUESTION)
    assert not delta.append_only and "<|endoftext|>" in delta.note
    assert r.decode(delta.ids) == NEXT_USER_TURN[len("<|im_end|>") :]


def test_template_that_hides_assistant_text_is_a_clear_error():
    tok = copy.copy(tokenizer("qwen2_5"))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatRenderError, match="does not render the assistant's text verbatim"):
        ChatRenderer(tok)


def test_tokenizer_without_template_is_a_clear_error():
    tok = copy.copy(tokenizer("qwen2_5"))
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatRenderer(tok)
