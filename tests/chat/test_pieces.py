"""Plain ASCII text tokenised pre-token by pre-token gives exactly the tokenizer's own ids."""

import random

import pytest
import regex

from miles_envs.chat.pieces import PieceEncoder
from tests.chat.conftest import TEMPLATE_KWARGS, tokenizer

# Pieces chosen for the pre-tokenizer patterns' corners: contractions in any case, whitespace runs
# before words and at the end, carriage returns, digit runs (grouped by three in some vocabularies),
# punctuation runs that absorb newlines, markup that is and is not an added token.
PIECES = ["'s", "'T", "'Re", "'ve", "'LL", "don't", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "Hello", "world",
          "x", "A", "1", "12", "1234567", " 3.14", "-42", "{", '{"name": "calc", "arguments": {"x": 1}}', "!!", "?\n",
          "...\n\n", "<", ">", "</", "<tool_call>", "</tool_response>", "<|im_start|>", "<|im_end|>", "<|eot_id|>",
          "<|begin_of_text|>", "P-1234", "a_b", "`code`", "~", "|", "\\"]


def reference(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_ascii_text_gets_the_tokenizers_ids(name):
    tok = tokenizer(name)
    pieces = PieceEncoder.for_backend(tok.backend_tokenizer)
    assert pieces is not None, "every shared tokenizer has the byte-level BPE layout"
    rng = random.Random(1)
    for _ in range(600):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        assert pieces.encode(text) == reference(tok, text), text
    assert pieces.enabled and pieces.calls == 600


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_every_printable_ascii_character_and_pair(name):
    tok = tokenizer(name)
    pieces = PieceEncoder.for_backend(tok.backend_tokenizer)
    chars = ["\t", "\n", "\r", *map(chr, range(0x20, 0x7F))]
    text = "".join(a + b + " " + b + a for a in chars[::3] for b in chars)
    assert pieces.encode(text) == reference(tok, text)


def test_text_outside_plain_ascii_is_left_to_the_rust_pipeline():
    pieces = PieceEncoder.for_backend(tokenizer("qwen3").backend_tokenizer)
    for text in ("naïve", "東京", "🙂", "a\x0bb", "form\x0cfeed", "\x1c", "nul\x00"):
        assert pieces.encode(text) is None, text
    assert pieces.calls == 0


def test_a_reading_that_disagrees_with_the_tokenizer_is_caught_and_turned_off():
    tok = tokenizer("qwen3")
    wrong = PieceEncoder(tok.backend_tokenizer, [regex.compile("(.)")])  # one pre-token per character: not Qwen's split
    with pytest.warns(RuntimeWarning, match="per-word reuse turned off"):
        assert wrong.encode("Hello world") == reference(tok, "Hello world")  # the first call is checked
    assert not wrong.enabled
    assert wrong.encode("Hello again") is None  # from now on the Rust pipeline tokenises


def test_pre_token_cache_stays_bounded():
    tok = tokenizer("qwen3")
    pieces = PieceEncoder(tok.backend_tokenizer, PieceEncoder.for_backend(tok.backend_tokenizer).patterns, size=8)
    words = [f" w{i}x" for i in range(40)]
    for word in words:
        assert pieces.encode(word) == reference(tok, word)
        assert len(pieces._ids) <= 8


def test_layouts_it_does_not_read_get_no_fast_path():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PieceEncoder.for_backend(word_level) is None
    lowered = Tokenizer.from_str(tokenizer("qwen3").backend_tokenizer.to_str())
    lowered.normalizer = normalizers.Lowercase()  # changes ASCII text: not an identity
    assert PieceEncoder.for_backend(lowered) is None
    prefixed = Tokenizer.from_str(tokenizer("qwen3").backend_tokenizer.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert PieceEncoder.for_backend(prefixed) is None


def test_added_tokens_that_strip_or_bind_to_words_are_left_to_the_rust_pipeline():
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(tokenizer("qwen3").backend_tokenizer.to_str())
    backend.add_tokens([AddedToken("<mark>", lstrip=True), AddedToken("<word>", single_word=True)])
    pieces = PieceEncoder.for_backend(backend)
    assert pieces.encode("a <mark> b") is None
    assert pieces.encode("a<word>b") is None
    text = "<|im_start|>user\n<tool_response>ok</tool_response><|im_end|>\n"
    assert pieces.encode(text) == backend.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", list(TEMPLATE_KWARGS))
def test_patterns_spelled_out_for_ascii_split_like_the_patterns_as_written(name):
    import json
    import re

    tok = tokenizer(name)
    pieces = PieceEncoder.for_backend(tok.backend_tokenizer)
    config = json.loads(tok.backend_tokenizer.pre_tokenizer.__getstate__())
    written = [regex.compile(f"({step['pattern']['Regex']})") for step in config["pretokenizers"] if step["type"] == "Split"]
    assert all(isinstance(p, re.Pattern) for p in pieces.patterns)  # the faster engine is in use
    chars = ["\t", "\n", "\r", *map(chr, range(0x20, 0x7F))]
    rng = random.Random(2)
    for _ in range(3000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 24)))
        assert [p.split(text) for p in pieces.patterns] == [p.split(text) for p in written], text


def test_pattern_forms_without_a_plain_spelling_keep_the_regex_module():
    from miles_envs.chat.pieces import _compile

    for source in (r"[^\P{L}x]+", r"[[a-z]&&[^aeiou]]+", r"\p{Script=Latin}+"):
        assert isinstance(_compile(source), regex.Pattern), source
    assert _compile(r"\p{L}+").split("ab1c") == regex.compile(r"(\p{L}+)").split("ab1c")
