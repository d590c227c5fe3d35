"""Encode and decode through the Rust ``tokenizers.Tokenizer`` behind a transformers fast tokenizer.

A turn tokenises a few dozen characters and decodes one reply; transformers' wrappers around the
Rust calls (argument normalisation, ``BatchEncoding``, batch-of-one encoding) cost as much again as
the work itself. ``TokenizerCalls`` calls the backend directly, but only after checking on probe
texts (special tokens, tool markup, whitespace runs, non-ASCII) that it gives exactly what the
transformers calls give; any difference, or a tokenizer without a Rust backend, keeps the
transformers calls. Plain ASCII text goes through ``PieceEncoder`` (per-word reuse, same ids) and
replies decode through ``ByteDecoder`` (tokens' bytes joined) where the tokenizer's layout allows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from miles_envs.chat.byte_decoder import ByteDecoder
from miles_envs.chat.pieces import PieceEncoder

_PROBES = (
    "Hello, world!",
    "  leading and trailing spaces  \n\n\n",
    "<|im_start|>user\n<tool_response>\n{\"a\": 1}\n</tool_response><|im_end|>\n",
    "naïve café — 東京 🙂\t tabs",
    "<think>\n\n</think>\n\n12 * 34 = 408",
)


class TokenizerCalls:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and self._same_as_transformers(backend) else None
        self.pieces = PieceEncoder.for_backend(self.backend) if self.backend is not None else None
        self.bytes = ByteDecoder.for_backend(self.backend) if self.backend is not None else None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without added special tokens (the chat template writes its own)."""
        if self.pieces is not None and (ids := self.pieces.encode(text)) is not None:
            return ids
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.reference_encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens kept, no clean-up of spaces."""
        if self.bytes is not None and (text := self.bytes.decode(ids)) is not None:
            return text
        if self.backend is not None:
            return self.backend.decode(list(ids), skip_special_tokens=False)
        return self.reference_decode(ids)

    def reference_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reference_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _same_as_transformers(self, backend: Any) -> bool:
        try:
            for text in _PROBES:
                ids = self.reference_encode(text)
                if backend.encode(text, add_special_tokens=False).ids != ids:
                    return False
                if backend.decode(ids, skip_special_tokens=False) != self.reference_decode(ids):
                    return False
        except Exception:  # a backend that cannot take these calls is not used
            return False
        return True
