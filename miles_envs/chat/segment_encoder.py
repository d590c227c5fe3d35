"""Tokenise rendered chat text segment by segment, reusing the segments every episode shares.

Every episode of an env renders the same system prompt and tool schemas, and tokenising that text
costs more than the rest of a turn (≈0.3 µs per character with a 150k vocabulary). Tokenizers cut
text at added tokens (special ones, and markup such as Qwen's ``<tool_response>``) before any
normalisation or BPE, so text split just before each added token tokenises to the same ids piece by
piece as in one go. ``SegmentEncoder`` splits there, keeps the ids of recent segments, and
tokenises only the pieces it has not seen: a tool result costs only its own characters.

Only added tokens that cannot absorb the whitespace before them (``lstrip``), match regardless of
their neighbours (not ``single_word``) and are matched before normalisation are used as cut points. As with the delta cache, the first and every ``verify_every``-th
call is also tokenised whole and compared; one mismatch turns the reuse off for good, with a warning.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from miles_envs.chat.backend import TokenizerCalls
from miles_envs.chat.spot_check import SpotChecked


class SegmentEncoder(SpotChecked):
    def __init__(self, tokenizer: Any, size: int = 8192, verify_every: int = 256, tokenizer_calls: TokenizerCalls | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_calls = tokenizer_calls or TokenizerCalls(tokenizer)
        self.size, self.verify_every = size, verify_every
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        cuts = _cut_tokens(tokenizer)
        # the cut tokens captured (not a lookahead): the scan then jumps between their first characters
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(cuts, key=len, reverse=True))) + ")") if cuts else None
        self.enabled = self._split is not None

    def encode(self, text: str) -> list[int]:
        if not self.enabled:
            return self._encode(text)
        ids: list[int] = []
        for segment in self.segments(text):
            ids += self._segment_ids(segment)
        return self.spot_checked(ids, lambda: self.tokenizer_calls.reference_encode(text),
                                 "this tokenizer does not tokenise chat text the same piece by piece: segment reuse")

    def forget(self) -> None:
        self._ids.clear()

    def segments(self, text: str) -> list[str]:
        """``text`` cut just before each cut token (no empty pieces)."""
        parts = self._split.split(text)  # text, cut token, text, cut token, text, ...
        pieces = [parts[index] + parts[index + 1] for index in range(1, len(parts), 2)]
        return [parts[0], *pieces] if parts[0] else pieces

    def _segment_ids(self, segment: str) -> list[int]:
        ids = self._ids.get(segment)
        if ids is None:
            ids = self._ids[segment] = self._encode(segment)
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return ids

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer_calls.encode(text)


def _cut_tokens(tokenizer: Any) -> list[str]:
    """Added tokens that are safe places to cut the text before."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in added.values()
            if not t.lstrip and not getattr(t, "single_word", False) and not getattr(t, "normalized", False)]
