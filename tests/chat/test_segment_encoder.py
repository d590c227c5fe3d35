"""Piecewise tokenisation at special tokens gives the tokenizer's own ids, and reuses shared pieces."""

import pytest

from miles_envs.chat import ChatRenderer
from miles_envs.chat.segment_encoder import SegmentEncoder
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a record.",
          "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}]
ODD_TEXTS = ["  leading spaces", "trailing  \n\n", "tabs\tand\r\nnewlines", "emoji 🙂 and CJK 漢字", "x" * 300, ""]


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_piecewise_ids_equal_whole_text_ids(name):
    tok = tokenizer(name)
    renderer = ChatRenderer(tok, TEMPLATE_KWARGS[name])
    encoder = SegmentEncoder(tok, verify_every=10**9)
    assert encoder.enabled
    for i, odd in enumerate(ODD_TEXTS):
        messages = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": f"Question {i}: {odd}"}]
        text = renderer.template.render(messages, TOOLS, add_generation_prompt=True)
        for sample in (text, text + odd, odd + text, text.replace("\n", " ")):
            assert encoder.encode(sample) == tok.encode(sample, add_special_tokens=False), (name, sample[:80])


def test_shared_prompt_pieces_are_tokenised_once():
    tok = tokenizer("qwen3")
    renderer = ChatRenderer(tok)
    prompts = [renderer.template.render([{"role": "system", "content": "Use the tools."}, {"role": "user", "content": f"Q{i}"}],
                                        TOOLS, add_generation_prompt=True) for i in range(20)]
    encoder = SegmentEncoder(tok)
    for prompt in prompts:
        encoder.encode(prompt)
    pieces_per_prompt = len(set(encoder.segments(prompts[0])))
    assert len(encoder._ids) == pieces_per_prompt + 19  # the system/tools piece and the header pieces are shared


def test_tool_results_are_cut_at_their_markup_tokens():
    """Qwen's ``<tool_response>`` is an added (not special) token: a tool result is tokenised apart from its wrapping."""
    tok = tokenizer("qwen3")
    encoder = SegmentEncoder(tok)
    texts = [f"<|im_end|>\n<|im_start|>user\n<tool_response>\n{n * 37} * 12 = {n * 444}\n</tool_response><|im_end|>\n"
             for n in range(10)]
    for text in texts:
        assert encoder.encode(text) == tok.encode(text, add_special_tokens=False)
    shared = {"<|im_end|>\n", "<|im_start|>user\n", "</tool_response>"}
    assert shared <= set(encoder._ids) and len(encoder._ids) == len(shared) + len(texts)
