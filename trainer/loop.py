"""The rollout -> train -> weight-sync loop.

Each step runs ``tasks_per_step`` env tasks x ``group_size`` episodes through
``miles_envs.loop.rollout`` (routing traces requested when the trainer replays them), trains one
step on the finished trajectories, and pushes the new weights to the engine with the step's
version. Metrics go to ``out_dir/metrics.jsonl`` (one JSON object per step) and a checkpoint is
written every ``checkpoint_every`` steps; a run restarted with the same ``out_dir`` resumes from
the newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

from miles_envs.agents.engine import Engine
from miles_envs.loop import LoopConfig, rollout
from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from miles_envs.trainer.torch_backend import Trainer
from miles_envs.trajectory import Trajectory


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Outcome and speculative-decoding statistics of one step's rollouts."""
    accepted = sum(turn.spec_accepted_tokens for t in trajectories for turn in t.turns)
    drafted = sum(turn.spec_draft_tokens for t in trajectories for turn in t.turns)
    statuses = [t.status.value for t in trajectories]
    metrics = {f"rollout/{s}_frac": statuses.count(s) / len(statuses) for s in sorted(set(statuses))}
    if drafted:
        metrics["rollout/spec_accept_rate"] = accepted / drafted
    return metrics


async def train(
    env_id: str,
    engine: Engine,
    trainer: Trainer,
    steps: int,
    *,
    renderer: Any,
    parser: Any = None,
    tasks_per_step: int = 8,
    group_size: int = 4,
    loop_config: LoopConfig | None = None,
    out_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    collect: Callable[[int, int, LoopConfig, int], Awaitable[list[Trajectory]]] | None = None,
) -> list[dict[str, float]]:
    """Train for ``steps`` steps in total (counting resumed ones); returns this run's step metrics.

    ``collect(n, group_size, config, seed)`` replaces the in-process rollout (e.g. Ray rollout
    workers, ``miles_envs.distributed``); ``engine`` then only receives the weight syncs.
    """
    config = replace(loop_config or LoopConfig(), return_routed_experts=trainer.config.r3)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        resume = latest_checkpoint(out / "checkpoints")
        if resume is not None:
            load_checkpoint(trainer, resume)
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
    history = []
    while trainer.step < steps:
        step_seed = seed + trainer.step * tasks_per_step
        if collect is not None:
            trajectories = await collect(tasks_per_step, group_size, config, step_seed)
        else:
            stream = rollout(
                env_id, engine, renderer, parser=parser, n=tasks_per_step, group_size=group_size, config=config, seed=step_seed
            )
            trajectories = [t async for t in stream]
        metrics = {**trainer.train_step(trajectories), **rollout_metrics(trajectories)}
        await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
        history.append(metrics)
        if out is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if trainer.step % checkpoint_every == 0 or trainer.step == steps:
                save_checkpoint(trainer, out / "checkpoints")
        if on_step is not None:
            on_step(metrics)
    return history
