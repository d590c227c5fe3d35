"""``OpponentPool``: frozen snapshots of a learning policy, keyed by weight version.

Self-play against only the latest policy cycles and forgets; playing against a growing pool of
past versions (fictitious-self-play style) keeps old strategies beaten. The pool also keeps each
snapshot's results, so a run can report its win rate against the pool and draw the snapshots it
still loses to more often (prioritized fictitious self-play), which keeps the pressure on once the
learner beats most of its past.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miles_envs.multi_loop import AgentPolicy


class OpponentPool:
    def __init__(self, max_size: int | None = None) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size={max_size}: a pool holds at least one snapshot (or None for no limit)")
        self.max_size = max_size
        self._members: OrderedDict[str, AgentPolicy] = OrderedDict()
        self._scores: dict[str, list[float]] = {}

    def add(self, version: str, policy: AgentPolicy) -> AgentPolicy:
        """Keep ``policy`` as the frozen snapshot of ``version`` (never trained); evicts the oldest when full."""
        if version in self._members:
            raise ValueError(f"the pool already holds weight version {version!r}; snapshot each version once")
        frozen = replace(policy, trainable=False, name=f"pool:{version}")
        self._members[version] = frozen
        self._scores.setdefault(version, [])
        while self.max_size is not None and len(self._members) > self.max_size:
            self._members.popitem(last=False)
        return frozen

    def sample(self, rng: random.Random, hardness: float = 0.0, window: int = 64) -> tuple[str, AgentPolicy]:
        """A drawn (version, snapshot): uniformly, or with ``hardness`` p > 0 weighted by
        ``(1 - score)**p``, the learner's mean score over its last ``window`` games against that
        version (0.5 before any); a floor of 0.05 keeps every snapshot in play."""
        if not self._members:
            raise LookupError("the opponent pool is empty: add() a snapshot before sampling")
        if hardness < 0:
            raise ValueError(f"hardness={hardness}: use 0 (uniform) or a positive exponent")
        versions = list(self._members)
        if hardness == 0:
            version = rng.choice(versions)
        else:
            weights = [max(1.0 - self._recent_score(v, window), 0.05) ** hardness for v in versions]
            version = rng.choices(versions, weights=weights)[0]
        return version, self._members[version]

    def _recent_score(self, version: str, window: int) -> float:
        recent = self._scores.get(version, [])[-window:]
        return sum(recent) / len(recent) if recent else 0.5

    def policy(self, version: str) -> AgentPolicy:
        """The snapshot kept for ``version``."""
        return self._members[version]

    def record(self, version: str, score: float) -> None:
        """The learner's result against ``version``: 1 win, 0.5 draw, 0 loss."""
        self._scores.setdefault(version, []).append(float(score))

    def win_rates(self) -> dict[str, float]:
        """Mean recorded score per version that has results."""
        return {v: sum(s) / len(s) for v, s in self._scores.items() if s}

    @property
    def versions(self) -> list[str]:
        return list(self._members)

    def __len__(self) -> int:
        return len(self._members)
