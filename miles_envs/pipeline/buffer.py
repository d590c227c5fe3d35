"""The rollout buffer of asynchronous training: finished trajectories in, complete groups out.

Groups are numbered by the run (group ``i`` plays env seed ``seed + i``, the task a synchronous run
would play as task ``i % tasks_per_step`` of step ``i // tasks_per_step``). Producers stream each
finished trajectory in with its group number; a group becomes ready when all its members are in,
and the trainer takes ready groups in the order they completed.

Staleness: the trainer takes groups for the step that trains weights version ``v`` (``"step-v"``).
A trajectory's staleness is ``v`` minus the oldest version that sampled any of its tokens
(``Trajectory.version_range``); a group's is its members' largest. A group more than
``max_staleness`` behind is never handed out: :meth:`RolloutBuffer.take` returns it as stale, and
the caller drops it or plays it again (resample). The whole group goes, not only its stale members,
because the group's advantage baseline needs every member. Tokens whose version is unknown count as
fresh.

:class:`GroupPosition` is what a checkpoint stores: which group numbers were handed out and which
are settled (trained on, or dropped). Groups handed out but unsettled at a kill were in flight or
buffered; a resumed run plays them again first, so none is lost and none is trained twice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from miles_envs.trajectory import Trajectory, version_number

STALE_POLICIES = ("drop", "resample")


def token_versions(trajectory: Trajectory) -> list[tuple[int, int | None]]:
    """``(token count, version number)`` per model-token span of the trajectory."""
    return [(end - start, version_number(v)) for start, end, v in trajectory.model_version_spans() if end > start]


def trajectory_staleness(trajectory: Trajectory, version: int) -> int:
    """How many versions the trajectory's oldest token is behind ``version`` (0 when unknown)."""
    oldest, _ = trajectory.version_range
    return max(0, version - oldest) if oldest is not None else 0


@dataclass
class Group:
    """One task's episodes (``size`` of them once complete) and their token count."""

    index: int
    size: int
    trajectories: list[Trajectory] = field(default_factory=list)
    tokens: int = 0

    @property
    def complete(self) -> bool:
        return len(self.trajectories) >= self.size

    def staleness(self, version: int) -> int:
        return max((trajectory_staleness(t, version) for t in self.trajectories), default=0)


@dataclass
class Take:
    """What :meth:`RolloutBuffer.take` hands back: the groups to train on and the stale ones."""

    groups: list[Group]
    stale: list[Group]

    @property
    def trajectories(self) -> list[Trajectory]:
        return [t for g in self.groups for t in g.trajectories]


class RolloutBuffer:
    """Complete groups in completion order, with the number of buffered tokens for back-pressure.

    ``max_staleness`` ``None`` turns the staleness bound off.
    """

    def __init__(self, group_size: int, *, max_staleness: int | None = None) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (versions behind the trainer), got {max_staleness}")
        self.group_size = group_size
        self.max_staleness = max_staleness
        self._partial: dict[int, Group] = {}
        self._ready: deque[Group] = deque()
        self._changed = asyncio.Event()
        self.tokens = 0

    @property
    def ready_groups(self) -> int:
        return len(self._ready)

    @property
    def partial_groups(self) -> int:
        return len(self._partial)

    def add(self, index: int, trajectory: Trajectory) -> None:
        """One finished trajectory of group ``index``."""
        group = self._partial.setdefault(index, Group(index, self.group_size))
        group.trajectories.append(trajectory)
        size = len(trajectory.tokens)
        group.tokens += size
        self.tokens += size
        if group.complete:
            del self._partial[index]
            self._ready.append(group)
            self._changed.set()

    def discard(self, index: int) -> None:
        """Forget a group whose episodes were cancelled before it completed."""
        group = self._partial.pop(index, None)
        if group is not None:
            self.tokens -= group.tokens

    def _pop(self) -> Group:
        group = self._ready.popleft()
        self.tokens -= group.tokens
        return group

    def take_ready(self, n: int, version: int) -> Take:
        """Up to ``n`` ready groups within the staleness bound of ``version``, without waiting."""
        groups, stale = [], []
        while self._ready and len(groups) < n:
            group = self._pop()
            if self.max_staleness is not None and group.staleness(version) > self.max_staleness:
                stale.append(group)
            else:
                groups.append(group)
        return Take(groups, stale)

    async def take(self, n: int, version: int, on_stale: Any = None) -> Take:
        """Wait for ``n`` groups within the staleness bound of ``version``.

        ``on_stale(groups)`` is called as stale groups turn up, so a caller that resamples can start
        them again while this call still waits.
        """
        taken = Take([], [])
        while len(taken.groups) < n:
            part = self.take_ready(n - len(taken.groups), version)
            taken.groups += part.groups
            taken.stale += part.stale
            if part.stale and on_stale is not None:
                on_stale(part.stale)
            if len(taken.groups) < n:
                self._changed.clear()
                await self._changed.wait()
        return taken


@dataclass
class GroupPosition:
    """Which group numbers were handed out (``issued``) and which are settled (trained or dropped).

    Stored compactly: every number below ``settled_below`` is settled, plus those in ``settled``.
    """

    issued: int = 0
    settled_below: int = 0
    settled: set[int] = field(default_factory=set)

    def issue(self) -> int:
        self.issued += 1
        return self.issued - 1

    def settle(self, index: int) -> None:
        self.settled.add(index)
        while self.settled_below in self.settled:
            self.settled.remove(self.settled_below)
            self.settled_below += 1

    def unsettled(self) -> list[int]:
        """Handed out but neither trained on nor dropped: to play (again) after a resume."""
        return [i for i in range(self.settled_below, self.issued) if i not in self.settled]

    def to_dict(self) -> dict[str, Any]:
        return {"issued": self.issued, "settled_below": self.settled_below, "settled": sorted(self.settled)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupPosition:
        return cls(int(data["issued"]), int(data["settled_below"]), {int(i) for i in data["settled"]})
