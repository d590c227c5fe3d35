"""Reading a number out of a model's free-text reply."""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str | None) -> int | None:
    """The last integer written in ``text`` (models often restate the question before answering)."""
    found = _INTEGER.findall(text or "")
    return int(found[-1]) if found else None
