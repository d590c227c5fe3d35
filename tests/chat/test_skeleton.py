"""Skeleton rendering gives the template's own text, and a template that reads contents is caught."""

import copy
import warnings

import pytest

from miles_envs.chat import ChatRenderer
from miles_envs.chat.skeleton import Skeletons, fillable
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a record.",
          "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}]
RESULTS = ["42", "Error: no record P-1234", "line one\nline two", 'quoted "value" & more', "multi\n\nparagraph\ttext"]


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_filled_skeletons_equal_real_renderings(name):
    renderer = ChatRenderer(tokenizer(name), TEMPLATE_KWARGS[name])
    real = lambda messages, tools: renderer.template.render(messages, tools, add_generation_prompt=True)  # noqa: E731
    skeletons = Skeletons(real, verify_every=10**9)
    used = 0
    for i, result in enumerate(RESULTS):
        prompt = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": f"Question {i}: {result}"}]
        observation = [{"role": "tool", "tool_call_id": f"call_{i}", "name": "lookup", "content": result}]
        for messages, fields, tools in (
            (prompt, [(1, "content")], TOOLS),
            ([*prompt, {"role": "assistant", "content": "ok"}, *observation], [(3, "content"), (3, "tool_call_id")], None),
        ):
            filled = skeletons.render(messages, fields, tools)
            if filled is not None:
                used += 1
                assert filled == real(messages, tools), (name, messages)
    assert used >= len(RESULTS)  # every family writes at least the prompt's question verbatim


def test_values_that_could_steer_a_template_are_never_filled():
    assert fillable("42") and fillable("a\nb")
    assert not any(map(fillable, ["", " padded", "trailing\n", "<tool_response>x", None, 3]))


def test_a_template_that_reads_contents_is_caught_by_verification():
    tok = copy.copy(tokenizer("qwen2_5"))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if 'urgent' in m.content %}[!] {% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tok)
    renderer.skeletons.verify_every = 3  # verifies the 1st (calm) and 4th (urgent) filled rendering
    exact = ChatRenderer(tok, cache_deltas=False)
    exact.skeletons.enabled = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, word in enumerate(("calm", "urgent", "calm", "urgent", "calm", "urgent")):
            renderer.prompt_ids([{"role": "user", "content": f"an {word} question {i}"}])
    assert not renderer.skeletons.enabled
    assert any("skeleton rendering turned off" in str(w.message) for w in caught)
    messages = [{"role": "user", "content": "an urgent matter"}]
    assert renderer.prompt_ids(messages) == exact.prompt_ids(messages)
