"""Whole groups out of a rollout stream: what a GRPO-family consumer trains on.

A group (one task, ``group_size`` episodes sharing a seed) is complete once every member has
finished, its aborted members having been retried by the loop first. Its statistics count only
completed and truncated members; a group with none of those is dropped here and counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from miles_envs.trajectory import Status, Trajectory

SCORED = (Status.COMPLETED, Status.TRUNCATED)


@dataclass
class GroupCounts:
    complete: int = 0
    dropped: int = 0  # every member aborted or failed: nothing to compare within the group


async def complete_groups(
    stream: AsyncIterator[Trajectory], group_size: int, counts: GroupCounts | None = None
) -> AsyncIterator[list[Trajectory]]:
    """Yield each group's members together once all ``group_size`` have arrived (memory: open groups only)."""
    counts = counts if counts is not None else GroupCounts()
    open_groups: dict[str | None, list[Trajectory]] = {}
    async for trajectory in stream:
        members = open_groups.setdefault(trajectory.group_id, [])
        members.append(trajectory)
        if len(members) < group_size:
            continue
        del open_groups[trajectory.group_id]
        if any(m.status in SCORED for m in members):
            counts.complete += 1
            yield members
        else:
            counts.dropped += 1
