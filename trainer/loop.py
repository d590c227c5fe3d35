"""The synchronous rollout -> train -> weight-sync loop, and the run folder both loops share.

Each step runs ``tasks_per_step`` env tasks x ``group_size`` episodes through
``miles_envs.loop.rollout`` (routing traces requested when the trainer replays them), trains one
step on the finished trajectories, and pushes the new weights to the engine with the step's
version. Metrics go to ``out_dir/metrics.jsonl`` (one JSON object per step) and a checkpoint is
written every ``checkpoint_every`` steps; a run restarted with the same ``out_dir`` resumes from
the newest checkpoint, and the step records written after that checkpoint (steps the killed run
did not save) are cut, so every step appears once. The asynchronous loop is
:func:`miles_envs.trainer.async_loop.train_async`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

from miles_envs.engine import Engine
from miles_envs.atomic import write_text_atomically
from miles_envs.loop import LoopConfig, rollout
from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, load_run_state, save_checkpoint
from miles_envs.trainer.torch_backend import Trainer
from miles_envs.trajectory import Trajectory
from miles_envs.weight_sync import Tensors

METRICS_FILE = "metrics.jsonl"


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Outcome and speculative-decoding statistics of one step's rollouts."""
    accepted = sum(turn.spec_accepted_tokens for t in trajectories for turn in t.turns)
    drafted = sum(turn.spec_draft_tokens for t in trajectories for turn in t.turns)
    statuses = [t.status.value for t in trajectories]
    metrics = {f"rollout/{s}_frac": statuses.count(s) / len(statuses) for s in sorted(set(statuses))}
    if drafted:
        metrics["rollout/spec_accept_rate"] = accepted / drafted
    return metrics


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps up to ``last_step`` (and drop a line torn by a kill), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("step", 0)) <= last_step:
            kept.append(line)
    write_text_atomically(path, "".join(f"{line}\n" for line in kept))


class RunFolder:
    """``out_dir``: the per-step records and the checkpoints (with the loop's own state) of a run."""

    def __init__(self, out_dir: str | Path, *, checkpoint_every: int = 10, keep_checkpoints: int = 2) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.out / "checkpoints"
        self.checkpoint_every = checkpoint_every
        self.keep = keep_checkpoints

    def resume(self, trainer: Trainer) -> dict[str, Any] | None:
        """Load the newest checkpoint into ``trainer`` (if any), cut later step records, and return
        the run state saved with it. Returns ``None`` for a fresh run."""
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return None
        load_checkpoint(trainer, path)
        trim_jsonl(self.out / METRICS_FILE, trainer.step)
        return load_run_state(path) or {}

    def record(self, trainer: Trainer, metrics: dict[str, Any], last_step: int, run_state: dict[str, Any] | None = None) -> None:
        """Append the step's record, then checkpoint when due (a kill in between is cut on resume)."""
        with (self.out / METRICS_FILE).open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if trainer.step % self.checkpoint_every == 0 or trainer.step == last_step:
            save_checkpoint(trainer, self.checkpoints, keep=self.keep, run_state=run_state)


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
    keep_checkpoints: int = 2,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    collect: Callable[[int, int, LoopConfig, int], Awaitable[list[Trajectory]]] | None = None,
) -> list[dict[str, float]]:
    """Train for ``steps`` steps in total (counting resumed ones); returns this run's step metrics.

    ``collect(n, group_size, config, seed)`` replaces the in-process rollout (e.g. Ray rollout
    workers, ``miles_envs.distributed``); ``engine`` then only receives the weight syncs.
    """
    config = replace(loop_config or LoopConfig(), return_routed_experts=trainer.config.r3)
    folder = None
    if out_dir is not None:
        folder = RunFolder(out_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
        if folder.resume(trainer) is not None:
            await engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version)
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
        await engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version)
        history.append(metrics)
        if folder is not None:
            folder.record(trainer, metrics, steps)
        if on_step is not None:
            on_step(metrics)
    return history
