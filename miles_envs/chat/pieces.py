"""Exact tokenisation of plain ASCII text, one pre-token at a time, with each pre-token's ids kept.

Tokenising a short text through the Rust tokenizer costs ~0.4 µs per character, most of it in the
pre-tokenizer's regular expression and the per-call pipeline, while the pre-tokens themselves (words,
digits, punctuation runs, whitespace) repeat endlessly across tool results and prompts. For the
common byte-level BPE layout (added tokens, then Split regexes with ``Isolated`` behaviour, then
``ByteLevel`` without its own regex, then BPE) ``PieceEncoder`` does the same steps itself: added
tokens are cut out, the text is split with the tokenizer's own patterns (Unicode properties spelled
out as the ASCII characters they hold, for ``re``), and each pre-token's ids come from a cache filled
by the tokenizer's own BPE model.

Only text of printable ASCII, tab, newline and carriage return is taken: there the normaliser (none
or Unicode normal forms) changes nothing and the pattern engines agree on every character class;
anything else returns None and goes through the Rust pipeline. The first and every ``verify_every``-th
call is also tokenised by the Rust pipeline and compared; one mismatch turns the fast path off for
good, with a warning, so a layout this reading gets wrong costs speed, never exactness.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import regex

from miles_envs.chat.spot_check import SpotChecked

_PLAIN = re.compile(r"[\t\n\r\x20-\x7e]*")
_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}  # identities on ASCII


class PieceEncoder(SpotChecked):
    def __init__(self, backend: Any, patterns: list[Any], size: int = 1 << 16, verify_every: int = 256) -> None:
        self.backend, self.patterns = backend, patterns
        self.size, self.verify_every = size, verify_every
        self._model = backend.model
        self._ids: dict[str, list[int]] = {}
        byte_level = _byte_level()
        self._to_bytes = str.maketrans({c: byte_level.pre_tokenize_str(c)[0][0] for c in map(chr, _plain_codes())})
        added = [t for t in backend.get_added_tokens_decoder().values() if _PLAIN.fullmatch(t.content) and t.content]
        self._added = {t.content: (backend.token_to_id(t.content), _plain_added(t)) for t in added}
        longest_first = sorted(self._added, key=len, reverse=True)
        self._split_added = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added else None

    @classmethod
    def for_backend(cls, backend: Any) -> PieceEncoder | None:
        """The fast path for this Rust tokenizer, or None when its layout is not the one read here."""
        try:
            patterns = _split_patterns(backend)
        except (AttributeError, ValueError, TypeError, regex.error):
            return None
        return None if patterns is None else cls(backend, patterns)

    def encode(self, text: str) -> list[int] | None:
        """Ids of ``text`` without added special tokens; None when the text is not plain ASCII."""
        if not self.enabled or not _PLAIN.fullmatch(text):
            return None
        ids = self._encode(text)
        if ids is None:
            return None
        return self.spot_checked(ids, lambda: self.backend.encode(text, add_special_tokens=False).ids,
                                 "this tokenizer does not tokenise plain text the way its configuration reads: per-word reuse")

    def forget(self) -> None:
        self._ids.clear()

    def _encode(self, text: str) -> list[int] | None:
        ids: list[int] = []
        chunks = self._split_added.split(text) if self._split_added is not None else [text]
        for index, chunk in enumerate(chunks):
            if index % 2:  # an added token
                token_id, plain = self._added[chunk]
                if not plain:  # stripping or word-bound matching: left to the Rust pipeline
                    return None
                ids.append(token_id)
            elif chunk:
                self._encode_plain(chunk, ids)
        return ids

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        pieces = [text]
        for pattern in self.patterns:
            pieces = [part for piece in pieces for part in pattern.split(piece) if part]
        cache = self._ids
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = [token.id for token in self._model.tokenize(piece.translate(self._to_bytes))]
                if len(cache) >= self.size:
                    cache.clear()
                cache[piece] = piece_ids
            ids += piece_ids


def _split_patterns(backend: Any) -> list[Any] | None:
    """The Split patterns (each with one capturing group, so ``split`` keeps the matches) of a supported layout."""
    if backend.truncation is not None or backend.padding is not None or getattr(backend, "encode_special_tokens", False):
        return None
    if backend.normalizer is not None and not _identity_on_ascii(json.loads(backend.normalizer.__getstate__())):
        return None
    model = backend.model
    if type(model).__name__ != "BPE" or model.dropout or model.continuing_subword_prefix or model.end_of_word_suffix:
        return None
    if backend.pre_tokenizer is None:
        return None
    config = json.loads(backend.pre_tokenizer.__getstate__())
    steps = config["pretokenizers"] if config["type"] == "Sequence" else [config]
    *splits, last = steps
    if last != {**last, "type": "ByteLevel", "add_prefix_space": False, "use_regex": False} or not splits:
        return None
    patterns = []
    for step in splits:
        if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
            return None
        pattern = step["pattern"]
        patterns.append(_compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])))
    return patterns


@functools.cache  # one translation per pattern per process (each renderer builds an encoder)
def _compile(source: str) -> Any:
    """The pattern with one capturing group: through ``re`` with Unicode properties spelled out as the
    ASCII characters they hold (2-3x faster than the ``regex`` module), else as written through ``regex``."""
    translated = _ascii_pattern(source)
    if translated is not None:
        try:
            return re.compile(f"({translated})")
        except re.error:
            pass
    return regex.compile(f"({source})")


_TOKEN = re.compile(r"\\[pP]\{\w+\}|\\.|\[\^?\]?|\]|[^\\\[\]]+", re.S)


def _ascii_pattern(source: str) -> str | None:
    """``source`` for plain ASCII text with each ``\\p{..}`` replaced by its ASCII members (None: a form not handled)."""
    plain = [chr(code) for code in _plain_codes()]
    out, in_class = [], False
    for token in _TOKEN.findall(source):
        if token[:2] in ("\\p", "\\P"):
            if len(token) == 2:
                return None  # a property spelled other than \p{Name}
            members = "".join(map(re.escape, (c for c in plain if regex.fullmatch(token, c))))
            if in_class and token[1] == "P":
                return None  # a negated property inside a class has no plain spelling
            out.append(members if in_class else f"[{members}]" if members else "(?!)")
        elif token.startswith("["):
            if in_class:
                return None  # a nested class: not in re's syntax
            in_class = True
            out.append(token)
        else:
            in_class = in_class and token != "]"
            out.append(token)
    return "".join(out)


def _identity_on_ascii(config: dict) -> bool:
    if config["type"] == "Sequence":
        return all(_identity_on_ascii(step) for step in config["normalizers"])
    return config["type"] in _NORMALIZERS


def _plain_added(token: Any) -> bool:
    """Matched as written wherever it occurs (no stripping, no word bounds, not after normalisation)."""
    return not (token.lstrip or token.rstrip or token.single_word or token.normalized)


def _plain_codes() -> list[int]:
    return [9, 10, 13, *range(0x20, 0x7F)]


def _byte_level() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
