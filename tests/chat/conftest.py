import logging
from functools import cache

from miles_envs.chat import ChatRenderer
from miles_envs.tokenizers import load_tokenizer

# Llama-3.2's template writes today's date unless it is given one.
TEMPLATE_KWARGS = {"qwen3": {}, "qwen2_5": {}, "llama3": {"date_string": "26 Jul 2024"}, "deepseek_v3": {}}


@cache
def tokenizer(name: str):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return load_tokenizer(name)


@cache
def renderer(name: str, **kwargs) -> ChatRenderer:
    return ChatRenderer(tokenizer(name), {**TEMPLATE_KWARGS[name], **kwargs})
