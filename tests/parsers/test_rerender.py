"""The recorded assistant message re-renders to the model's exact text and ids (real Qwen3 template)."""

import pytest

from miles_envs.parsers import get_parser
from miles_envs.tokenizers import load_tokenizer

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
SECOND = '<tool_call>\n{"name": "mul", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("add", "mul")
]


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 42.",
        "  The answer is 42.\n\n",  # whitespace the model wrote is the model's
        f"Let me add.\n{CALL}",
        f"Let me add.  \n{CALL}",
        f"{CALL}\n{SECOND}",
        f"Both:\n{CALL}\n{SECOND}",
        f"<think>\nadd first\n</think>\n\nLet me add.\n{CALL}",
        "<think>\nplain\n</think>\n\nIt is 3.\n",
    ],
)
def test_rendering_the_parsed_message_gives_back_the_models_text(qwen3, text):
    prompt = [{"role": "user", "content": "What is 1 + 2?"}]
    thinking = text.startswith("<think>")  # else the non-thinking prompt, which opens an empty think block
    before = qwen3.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=thinking)
    message = get_parser("hermes").parse(text).as_message()
    message["content"] = message["content"] or ""  # OpenAI's null content, as serving stacks hand it to a template
    after = qwen3.apply_chat_template([*prompt, message], tools=TOOLS, tokenize=False)
    assert after == before + text + "<|im_end|>\n"
    ids = qwen3.encode(after, add_special_tokens=False)
    assert ids == qwen3.encode(before, add_special_tokens=False) + qwen3.encode(text + "<|im_end|>\n", add_special_tokens=False)
