"""Locating tool calls in the model's own tokens, so the token view can outline them.

A tool call is found by the markers the model families write around it; the search runs only over
model-written tokens (the system prompt of a tool template also mentions the markers).
"""

from __future__ import annotations

import bisect
import re

# (opening marker, closing marker or None when the call runs to the end of the model turn)
TOOL_CALL_MARKERS: tuple[tuple[str, str | None], ...] = (
    ("<tool_call>", "</tool_call>"),  # Hermes / Qwen (JSON body) and Qwen3-coder (XML body)
    ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"),  # DeepSeek-V3
    ("<|python_tag|>", None),  # Llama 3
)

_TOOL_CALL = re.compile(
    "|".join(
        re.escape(opening) + (r".*?(?:" + re.escape(closing) + "|$)" if closing else ".*$")
        for opening, closing in TOOL_CALL_MARKERS
    ),
    re.DOTALL,
)


def tool_call_spans(texts: list[str], start: int, end: int) -> list[tuple[int, int]]:
    """Token spans ``[a, b)`` (indices into ``texts``) of the tool calls inside ``texts[start:end]``.

    A call left open (the turn was truncated) runs to ``end``.
    """
    offsets = []
    position = 0
    for text in texts[start:end]:
        offsets.append(position)
        position += len(text)
    joined = "".join(texts[start:end])
    spans = []
    for match in _TOOL_CALL.finditer(joined):
        first = bisect.bisect_right(offsets, match.start()) - 1
        last = bisect.bisect_left(offsets, match.end())
        spans.append((start + first, start + last))
    return spans
