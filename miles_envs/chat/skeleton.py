"""Render a chat template once per conversation shape, then fill the varying strings in.

A jinja chat template costs ~100 µs per render, more than the rest of a turn. Most of what varies
between episodes and turns (the user's question, a tool's result, a call id) is written verbatim,
so the template is rendered once with placeholders in those fields and later renderings only
splice the strings in. A shape is usable only when the template writes every placeholder verbatim
(checked with two placeholder families, one of them full of characters a filter would escape) and
the same way in both; a value is filled only when it cannot steer the template (a non-empty string
with no surrounding whitespace and no markup). The first and every ``verify_every``-th filled
rendering is rendered for real and compared; one mismatch turns skeletons off for good.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from miles_envs.chat.spot_check import SpotChecked

Message = Mapping[str, Any]
Render = Callable[[list[Message], Any], str]

_OPEN, _CLOSE = "\ue010", "\ue011"
_HOLE = re.compile(f"{_OPEN}([AB])(\\d+)[^{_CLOSE}]*{_CLOSE}")
_ESCAPABLE = "\"'\\\n\t&"  # what tojson, escape or trim filters would change
_UNFILLABLE = re.compile(f"[<>{_OPEN}{_CLOSE}]")


def fillable(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value == value.strip() and not _UNFILLABLE.search(value)


class Skeletons(SpotChecked):
    def __init__(self, render: Render, size: int = 1024, verify_every: int = 64) -> None:
        self._render, self.size, self.verify_every = render, size, verify_every
        self._shapes: OrderedDict[bytes, tuple[list[str], list[int]] | None] = OrderedDict()

    def render(self, messages: Sequence[Message], fields: Sequence[tuple[int, str]], tools: Any) -> str | None:
        """The template's text for ``messages``; None when this conversation cannot use a skeleton."""
        if not self.enabled:
            return None
        values = [messages[i][key] for i, key in fields]
        if not all(map(fillable, values)):
            return None
        holes = set(fields)
        shape = [{k: v for k, v in m.items() if (i, k) not in holes} for i, m in enumerate(messages)]
        try:
            key = orjson.dumps([shape, fields, tools])
        except TypeError:
            return None
        if key not in self._shapes:
            self._shapes[key] = self._build(messages, fields, tools)
            while len(self._shapes) > self.size:
                self._shapes.popitem(last=False)
        skeleton = self._shapes[key]
        if skeleton is None:
            return None
        literals, order = skeleton
        parts = [literals[0]]
        for literal, hole in zip(literals[1:], order):
            parts += (values[hole], literal)
        return self.spot_checked("".join(parts), lambda: self._render(list(messages), tools),
                                 "chat template output depends on more than a conversation's shape: skeleton rendering")

    def forget(self) -> None:
        self._shapes.clear()

    def _build(self, messages: Sequence[Message], fields: Sequence[tuple[int, str]], tools: Any) -> tuple[list[str], list[int]] | None:
        """(literals, hole order) shared by both placeholder families, or None when the template does not write them verbatim."""
        parsed = []
        for family, filler in (("A", ""), ("B", _ESCAPABLE)):
            marked = [dict(m) for m in messages]
            for n, (i, key) in enumerate(fields):
                marked[i][key] = f"{_OPEN}{family}{n}{filler}{_CLOSE}"
            try:
                text = self._render(marked, tools)
            except Exception:
                return None
            pieces = _HOLE.split(text)
            literals, order = pieces[0::3], [int(n) for n in pieces[2::3]]
            families = set(pieces[1::3])
            if families - {family} or any(f"{_OPEN}{family}{n}{filler}{_CLOSE}" not in text for n in order):
                return None
            if _OPEN in "".join(literals) or len(set(order)) != len(order):
                return None  # a placeholder was changed (escaped, cut) or written twice
            parsed.append((literals, order))
        return parsed[0] if parsed[0] == parsed[1] else None
