"""Did-you-mean suggestions for env ids."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def _bare_name(env_id: str) -> str:
    """``ns/Guess-Number-v0`` → ``guess-number``: what people misspell, without the shared parts."""
    name = env_id.rsplit("/", 1)[-1]
    stem, _, version = name.rpartition("-v")
    return (stem if stem and version.isdigit() else name).lower()


def close_ids(id: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """Ids that look like a misspelling of ``id``: only the best few, and none when nothing is close
    (every id shares its namespace and ``-v0``, so whole-id similarity would list unrelated envs)."""
    wanted = _bare_name(id)
    scored = []
    for candidate in known:
        name = _bare_name(candidate)
        score = difflib.SequenceMatcher(None, wanted, name).ratio()
        if len(wanted) >= 3 and (wanted in name or name in wanted):
            score = max(score, 0.8)
        if candidate.lower() == id.lower():
            score = 2.0
        scored.append((score, candidate))
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    if not scored or scored[0][0] < 0.75:
        return []
    best = scored[0][0]
    return [candidate for score, candidate in scored if score >= max(0.75, best - 0.1)][:limit]
