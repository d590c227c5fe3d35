"""Foreign env ids → registry ids (``namespace/Name-vN``, as Gymnasium parses them)."""

from __future__ import annotations

import re

# "Name-v0", "Name-v0-variant" (GEM, TextArena) and "name_v3" (PettingZoo modules)
_VERSIONED = re.compile(r"^(?P<name>.+?)(?:-v|_v)(?P<version>\d+)(?P<variant>-[\w:.-]+)?$")
_UNSAFE = re.compile(r"[^\w:.-]")


def registry_id(namespace: str, foreign_id: str) -> str:
    """``game:GuessTheNumber-v0-hard`` → ``gem/game:GuessTheNumber-hard-v0``; unversioned ids get ``-v0``."""
    match = _VERSIONED.match(foreign_id)
    if match is None:
        name, version = foreign_id, "0"
    else:
        name, version = match["name"] + (match["variant"] or ""), match["version"]
    return f"{namespace}/{_UNSAFE.sub('_', name)}-v{version}"
