"""``TokenIds``: an episode's token stream as a list that knows when its prefix was rewritten.

An engine client sends the whole token history with every turn, although a turn only appends to
it. ``TokenIds`` lets the client keep work done on a prefix (SGLang's client keeps the JSON of the
ids it already sent) and reuse it exactly: appending (``append``, ``extend``, ``+=``) keeps a
prefix intact, and every other change (item or slice assignment, deletion, ``insert``, ``pop``,
``remove``, ``sort``, ``reverse``, ``clear``, ``*=``) counts in ``edits``, so work keyed on
``(length, edits)`` is valid while the list is no shorter and ``edits`` is unchanged. It is a plain
``list`` to every other reader.
"""

from __future__ import annotations

from typing import Any


class TokenIds(list):
    __slots__ = ("edits", "engine_cache")

    def __init__(self, ids: Any = ()) -> None:
        super().__init__(ids)
        self.edits = 0
        self.engine_cache: Any = None  # one engine's work on a prefix, keyed as the module says


def _counting(name: str):
    method = getattr(list, name)

    def edit(self: TokenIds, *args: Any, **kwargs: Any) -> Any:
        self.edits += 1
        return method(self, *args, **kwargs)

    edit.__name__ = name
    return edit


for _name in ("__setitem__", "__delitem__", "insert", "pop", "remove", "sort", "reverse", "clear", "__imul__"):
    setattr(TokenIds, _name, _counting(_name))
