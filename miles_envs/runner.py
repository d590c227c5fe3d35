"""A rollout run to a file: resume, batched durable writes, progress, metrics JSON beside the output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles_envs.loop import LoopConfig, rollout
from miles_envs.metrics import RolloutMetrics
from miles_envs.trajectory import Trajectory
from miles_envs.trajectory_io import JsonlWriter, iter_jsonl, iter_parquet, journal_path, repair_jsonl, write_parquet

FLUSH_EVERY = 64
FLUSH_SECONDS = 1.0


def metrics_path(out: Path) -> Path:
    return out.with_name(out.name + ".metrics.json")


def finished_keys(journal: Path, env_id: str | None) -> set[str]:
    """Episodes already on disk (a torn last line from a killed run is cut first)."""
    if not journal.exists():
        return set()
    repair_jsonl(journal)
    return {t.episode_id for t in iter_jsonl(journal) if t.env_id == env_id and t.episode_id is not None}


async def run_to_file(
    env_id: str,
    engine: Any,
    renderer: Any,
    out: Path,
    *,
    n: int,
    group_size: int = 1,
    config: LoopConfig | None = None,
    concurrency: int = 256,
    seed: int = 0,
    parser: Any = None,
    on_trajectory: Callable[[Trajectory, RolloutMetrics], None] | None = None,
) -> dict[str, Any]:
    out = Path(out)
    journal = journal_path(out)
    if out != journal and out.exists() and not journal.exists():
        with JsonlWriter(journal) as seed_writer:  # resume a finished Parquet run: journal its episodes
            for trajectory in iter_parquet(out):
                seed_writer.write(trajectory)
    done = finished_keys(journal, env_id)
    metrics = RolloutMetrics()
    last_flush, unflushed = time.monotonic(), 0
    with JsonlWriter(journal) as writer:
        async for trajectory in rollout(
            env_id, engine, renderer, parser=parser, n=n, group_size=group_size, config=config,
            concurrency=concurrency, seed=seed, skip=done,
        ):
            writer.write(trajectory)
            metrics.add(trajectory)
            unflushed += 1
            if unflushed >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
                writer.flush()
                last_flush, unflushed = time.monotonic(), 0
            if on_trajectory is not None:
                on_trajectory(trajectory, metrics)
    summary = {**metrics.summary(), "env_id": env_id, "resumed_episodes": len(done), "output": str(out)}
    if out != journal:
        summary["written"] = write_parquet(iter_jsonl(journal), out)
        journal.unlink()
    metrics_path(out).write_text(json.dumps(summary, indent=2))
    return summary
