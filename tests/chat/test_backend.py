"""The Rust tokenizer, called directly, gives exactly the transformers tokenizer's ids and text."""

import random

import pytest

from miles_envs.chat.backend import TokenizerCalls
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer

PIECES = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_response>", "<think>", "<|eot_id|>", " ", "  ", "\n",
          "\n\n", "\t", "Hello", "world", "12 * 34 = 408", '{"name": "calc"}', "naïve", "東京", "🙂", "'s", "don't", "\r\n"]


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_direct_calls_match_the_transformers_calls(name):
    tok = tokenizer(name)
    calls = TokenizerCalls(tok)
    assert calls.backend is not None, "every shared tokenizer is a fast one"
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        ids = calls.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False), text
        assert calls.decode(ids) == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ids = [rng.randrange(tok.vocab_size) for _ in range(64)]  # any ids, not only those text encodes to
    assert calls.decode(ids) == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class NoBackend:
    """A tokenizer without a Rust backend (a slow, pure-Python one) keeps the transformers calls."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text, add_special_tokens=False):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)


def test_a_tokenizer_without_backend_uses_its_own_calls():
    calls = TokenizerCalls(NoBackend(tokenizer("qwen3")))
    assert calls.backend is None
    assert calls.encode("Hello world") == tokenizer("qwen3").encode("Hello world", add_special_tokens=False)
