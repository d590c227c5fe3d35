"""The synchronous schedule: rollout -> train -> weight sync, one step after another.

Each step runs ``tasks_per_step`` env tasks x ``group_size`` episodes through
``miles_envs.loop.rollout`` (routing traces requested when the trainer replays them), trains one
step on the finished trajectories (in task order, not finish order), and pushes the new weights
with the step's version. Records and resume: :class:`~miles_envs.pipeline.records.RunFolder`. The asynchronous schedule is
:func:`miles_envs.pipeline.async_run.train_async`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from miles_envs.engine import Engine
from miles_envs.loop import LoopConfig, episode_order, rollout
from miles_envs.pipeline.records import RunFolder, rollout_metrics
from miles_envs.pipeline.weights import InProcess, WeightSync
from miles_envs.trajectory import Trajectory


def rollout_config(loop_config: LoopConfig | None, trainer: Any) -> LoopConfig:
    """The rollouts' loop settings, asking for routing traces when the trainer replays them (R3)."""
    return replace(loop_config or LoopConfig(), return_routed_experts=trainer.config.r3)


async def train(
    env_id: str,
    engine: Engine,
    trainer: Any,
    steps: int,
    *,
    renderer: Any,
    parser: Any = None,
    tasks_per_step: int = 8,
    group_size: int = 4,
    loop_config: LoopConfig | None = None,
    out_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    keep_checkpoints: int = 2,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    collect: Callable[[int, int, LoopConfig, int], Awaitable[list[Trajectory]]] | None = None,
    weight_sync: WeightSync | None = None,
) -> list[dict[str, float]]:
    """Train for ``steps`` steps in total (counting resumed ones); returns this run's step metrics.

    ``collect(n, group_size, config, seed)`` replaces the in-process rollout (e.g. Ray rollout
    workers, ``miles_envs.distributed``). ``weight_sync`` says how weights reach the engines
    (default: the trainer's tensors to ``engine``, in process).
    """
    config = rollout_config(loop_config, trainer)
    sync = weight_sync or InProcess(engine)
    folder = None
    if out_dir is not None:
        folder = RunFolder(out_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
        if folder.resume(trainer) is not None:
            await sync.push(trainer)
    history = []
    while trainer.step < steps:
        step_seed = seed + trainer.step * tasks_per_step
        if collect is not None:
            trajectories = await collect(tasks_per_step, group_size, config, step_seed)
        else:
            stream = rollout(
                env_id, engine, renderer, parser=parser, n=tasks_per_step, group_size=group_size, config=config, seed=step_seed
            )
            trajectories = sorted([t async for t in stream], key=episode_order)  # the batch never depends on finish order
        metrics = {**trainer.train_step(trajectories), **rollout_metrics(trajectories)}
        await sync.push(trainer)
        history.append(metrics)
        if folder is not None:
            folder.record(trainer, metrics, steps)
        if on_step is not None:
            on_step(metrics)
    return history
