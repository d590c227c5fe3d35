"""Replies decoded as their tokens' bytes joined give exactly the Rust decoder's text, or defer to it."""

import random

import pytest

from miles_envs.chat.byte_decoder import ByteDecoder
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer

TEXTS = ["Hello, world!", "<tool_call>\n{\"name\": \"calc\", \"arguments\": {\"x\": 1}}\n</tool_call>", "naïve café — 東京 🙂",
         "<think>\n\n</think>\n\n12 * 34 = 408", "  \n\n\t\r\n ", "Ünïcödé ∑ 𝔘 ẞ"]


def rust(tok, ids):
    return tok.backend_tokenizer.decode(list(ids), skip_special_tokens=False)


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_random_ids_and_every_added_token_decode_as_the_rust_decoder_does(name):
    tok = tokenizer(name)
    backend = tok.backend_tokenizer
    decoder = ByteDecoder.for_backend(backend)
    assert decoder is not None, "every shared tokenizer decodes byte-level alone"
    rng = random.Random(3)
    vocab = backend.get_vocab_size()
    added = list(backend.get_added_tokens_decoder())
    deferred = 0
    for _ in range(1500):
        ids = [rng.choice(added) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        text = decoder.decode(ids)
        deferred += text is None
        assert text is None or text == rust(tok, ids), ids
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert decoder.decode(ids) == rust(tok, ids) == text
    assert deferred, "random ids cut characters somewhere: those calls must defer to the Rust decoder"
    assert decoder.enabled


def test_a_character_cut_between_calls_defers_to_the_lossy_rust_decoder():
    tok = tokenizer("qwen3")
    decoder = ByteDecoder.for_backend(tok.backend_tokenizer)
    ids = next(ids for char in "𝔘𠀋ẞ𓀀" if len(ids := tok.backend_tokenizer.encode(char, add_special_tokens=False).ids) > 1)
    assert decoder.decode(ids[:1]) is None
    assert "\ufffd" in rust(tok, ids[:1])


def test_a_wrong_table_is_caught_by_the_spot_check_and_turned_off():
    tok = tokenizer("qwen3")
    decoder = ByteDecoder.for_backend(tok.backend_tokenizer)
    ids = tok.backend_tokenizer.encode("Hello, world!", add_special_tokens=False).ids
    decoder._bytes[ids[0]] = b"Bye"  # as if the layout were read wrongly
    with pytest.warns(RuntimeWarning, match="byte decoding"):
        assert decoder.decode(ids) == "Hello, world!"  # the first call is checked, and the exact text wins
    assert not decoder.enabled and decoder.decode(ids) is None


def test_tokenizer_calls_decode_through_it():
    from miles_envs.chat.backend import TokenizerCalls

    tok = tokenizer("qwen3")
    calls = TokenizerCalls(tok)
    assert calls.bytes is not None
    ids = tok.backend_tokenizer.encode(TEXTS[1], add_special_tokens=False).ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert calls.decode(ids) == TEXTS[1] + "<|im_end|>"
    assert calls.bytes.calls == 1
