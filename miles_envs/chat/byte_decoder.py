"""Exact decoding of byte-level BPE ids by joining each token's bytes.

A turn's reply is decoded once for the parser and the template; through the Rust tokenizer that
costs ~0.2 µs per token, mostly the call and the decoder pipeline. With a ``ByteLevel`` decoder
alone, decoding is the tokens' bytes joined and read as UTF-8: each token's characters map back to
bytes through the byte-level alphabet (a token with a character outside it, such as an added token
written in other scripts, contributes its own UTF-8, as the decoder does). ``ByteDecoder`` keeps
each token's bytes and joins them; ids whose bytes are not valid UTF-8 as a whole (a character cut
between turns, which the Rust decoder replaces lossily) and unknown ids go through the Rust call.
Added tokens and probe texts are compared with the Rust decoder at construction; the first and every
``verify_every``-th call after is compared too, and one mismatch turns the shortcut off for good.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from miles_envs.chat.spot_check import SpotChecked

_PROBES = ("Hello, world!", "  spaces \n\n\t tabs", "naïve café — 東京 🙂", '<tool_call>\n{"a": 1}\n</tool_call>')


class ByteDecoder(SpotChecked):
    def __init__(self, backend: Any, verify_every: int = 256) -> None:
        self.backend, self.verify_every = backend, verify_every
        self._bytes: dict[int, bytes] = {}
        self._alphabet = _byte_alphabet()

    @classmethod
    def for_backend(cls, backend: Any) -> ByteDecoder | None:
        """The shortcut for this Rust tokenizer, or None when its decoder is not byte-level alone or disagrees on probes."""
        try:
            config = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
            if config.get("type") != "ByteLevel" or type(backend.model).__name__ != "BPE":
                return None
            decoder = cls(backend)
            added = list(backend.get_added_tokens_decoder())
            probes = [[token_id] for token_id in added] + [backend.encode(text, add_special_tokens=False).ids for text in _PROBES]
            if any(decoder._join(ids) != backend.decode(ids, skip_special_tokens=False) for ids in probes):
                return None
        except Exception:  # a backend that cannot take these calls keeps the Rust decoder
            return None
        return decoder

    def decode(self, ids: Sequence[int]) -> str | None:
        """Text of ``ids`` (special tokens kept); None when the Rust decoder must answer."""
        if not self.enabled:
            return None
        text = self._join(ids)
        if text is None:
            return None
        return self.spot_checked(text, lambda: self.backend.decode(list(ids), skip_special_tokens=False),
                                 "this tokenizer does not decode as its tokens' bytes joined: byte decoding")

    def forget(self) -> None:
        self._bytes.clear()

    def _join(self, ids: Sequence[int]) -> str | None:
        table = self._bytes
        try:
            parts = [table[token_id] for token_id in ids]
        except KeyError:
            parts = [self._token_bytes(token_id) for token_id in ids]
            if None in parts:
                return None
        try:
            return b"".join(parts).decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _token_bytes(self, token_id: int) -> bytes | None:
        known = self._bytes.get(token_id)
        if known is not None:
            return known
        token = self.backend.id_to_token(token_id)
        if token is None:
            return None
        alphabet = self._alphabet
        raw = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode("utf-8")
        self._bytes[token_id] = raw
        return raw


def _byte_alphabet() -> dict[str, int]:
    """Byte-level character → byte (GPT-2's table: printable bytes stand for themselves, the rest shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet
