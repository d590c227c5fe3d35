"""Rollout workers: Ray actors that each run ``miles_envs.loop.rollout`` on a contiguous shard of tasks.

A shard ``[first, end)`` runs the loop with ``n=end`` and every episode of the tasks before
``first`` skipped, so task ``i`` gets exactly the env seed (``seed + i``), sampling seed and
episode id it gets in a single-process run: the union of the shards *is* the single-process
rollout. Each worker builds its own engine (an SGLang client or an embedded engine) and renderer
from picklable factories, inside its own process.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import numpy as np

from miles_envs.loop import LoopConfig, episode_key, episode_order, rollout
from miles_envs.trajectory import Trajectory
from miles_envs.weight_sync import WeightSource


class RolloutWorker:
    """Holds one engine and renderer; ``run`` rolls out a task shard (an async Ray actor)."""

    def __init__(self, make_engine: Callable[[], Any], make_renderer: Callable[[], Any], make_parser: Callable[[], Any] | None = None):
        self.engine = make_engine()
        self.renderer = make_renderer()
        self.parser = make_parser() if make_parser is not None else None

    async def run(
        self, envs: Any, first_task: int, end_task: int, group_size: int, config: LoopConfig | None, seed: int
    ) -> list[Trajectory]:
        skip = {episode_key(t, m) for t in range(first_task) for m in range(group_size)}
        stream = rollout(
            envs, self.engine, self.renderer, parser=self.parser, n=end_task, group_size=group_size, config=config, seed=seed, skip=skip
        )
        return [t async for t in stream]

    async def update_weights(self, weights: WeightSource, version: str | None = None) -> None:
        await self.engine.update_weights(weights, version=version)


def start_rollout_workers(
    num_workers: int,
    make_engine: Callable[[], Any],
    make_renderer: Callable[[], Any],
    make_parser: Callable[[], Any] | None = None,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> list[Any]:
    """``num_workers`` ``RolloutWorker`` actors (Ray must be initialised)."""
    import ray

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RolloutWorker)
    return [actor.remote(make_engine, make_renderer, make_parser) for _ in range(num_workers)]


async def distributed_rollout(
    workers: Sequence[Any],
    envs: Any,
    *,
    n: int,
    group_size: int = 1,
    config: LoopConfig | None = None,
    seed: int = 0,
) -> list[Trajectory]:
    """``n`` tasks x ``group_size`` episodes over the workers, in (task, member) order."""
    if not workers:
        raise ValueError("distributed_rollout needs at least one worker: start_rollout_workers(...)")
    shards = [s for s in np.array_split(np.arange(n), len(workers)) if len(s)]
    refs = [w.run.remote(envs, int(s[0]), int(s[-1]) + 1, group_size, config, seed) for w, s in zip(workers, shards)]
    results = await asyncio.gather(*refs)
    return sorted((t for shard in results for t in shard), key=episode_order)
