"""A rollout run to a file: resume, retried aborts, batched durable writes, metrics JSON beside the output.

Episodes are appended to a journal (the ``.jsonl`` output itself, or ``out.parquet.journal.jsonl``)
with an index line each (``miles_envs.run_index``). Rerunning the same command resumes: the index
says which grid cells are on disk; aborted episodes are taken out of the journal and played again
(each exactly once per rerun, never written twice); everything else is skipped. The metrics JSON
is summed from the index, so it always describes every episode of the output, and is replaced
atomically.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from miles_envs.atomic import write_text_atomically
from miles_envs.loop import LoopConfig, rollout
from miles_envs.metrics import RolloutMetrics
from miles_envs.run_index import GridSet, IndexEntry, compact, index_path, iter_index, sync_index
from miles_envs.session import SessionConfig, as_session
from miles_envs.trajectory import Status, Trajectory
from miles_envs.trajectory_io import JsonlWriter, iter_jsonl, iter_parquet, journal_path, write_parquet

FLUSH_EVERY = 64
FLUSH_SECONDS = 1.0
SCORED = (Status.COMPLETED.value, Status.TRUNCATED.value)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.name + ".metrics.json")


def prepare_resume(out: Path, env_id: str | None, n: int, group_size: int) -> tuple[GridSet, int]:
    """Index what is on disk, take aborted episodes out for a retry: (cells done, aborts to retry)."""
    journal = journal_path(out)
    index = index_path(journal)
    if out != journal and out.exists() and not journal.exists():
        rows = iter_parquet(out)
        first = next(rows, None)  # a file that is not ours fails here, before anything is written
        with JsonlWriter(journal) as records, JsonlWriter(index) as lines:  # resume a finished Parquet run
            for trajectory in itertools.chain([first] if first else [], rows):
                lines.write_line(IndexEntry.of(trajectory, *records.write(trajectory)).to_line())
    sync_index(journal, index)
    retried = 0
    if any(e.env == env_id and e.status == Status.ABORTED.value for e in iter_index(index)):
        retried = compact(journal, index, lambda e: e.env == env_id and e.status == Status.ABORTED.value)
    done = GridSet(n, group_size)
    for entry in iter_index(index):
        if entry.env == env_id:
            done.add(entry.episode)
    return done, retried


def summarise(index: Path, env_id: str | None, n: int, group_size: int, run: RolloutMetrics) -> dict[str, Any]:
    """Metrics over every episode of the output (from the index); rates over this run's episodes."""
    total = RolloutMetrics()
    seen, scored = bytearray(n), bytearray(n)
    for entry in iter_index(index):
        if entry.env != env_id:
            continue
        total.add_digest(entry.digest)
        task = (entry.episode or "").partition(":")[0]
        if task.isdigit() and int(task) < n:
            seen[int(task)] = 1
            scored[int(task)] |= entry.status in SCORED
    summary = total.summary()
    run_summary = run.summary()
    for key in ("wall_s", "episodes_per_s", "model_tokens_per_s"):
        summary[key] = run_summary[key]
    summary["groups"] = sum(seen)
    summary["groups_dropped"] = sum(seen) - sum(scored)  # no completed or truncated member left
    return summary


async def run_to_file(
    env_id: str,
    engine: Any,
    renderer: Any,
    out: Path,
    *,
    n: int,
    group_size: int = 1,
    config: LoopConfig | None = None,
    session: SessionConfig | None = None,
    concurrency: int = 256,
    seed: int = 0,
    parser: Any = None,
    on_trajectory: Callable[[Trajectory, RolloutMetrics], None] | None = None,
) -> dict[str, Any]:
    """Roll out the grid into ``out``; a finished output is left untouched (``already_complete``)."""
    out = Path(out)
    journal = journal_path(out)
    index = index_path(journal)
    done, retried = prepare_resume(out, env_id, n, group_size)
    if done.full:
        previous = metrics_path(out)
        summary = json.loads(previous.read_text()) if previous.exists() else summarise(index, env_id, n, group_size, RolloutMetrics())
        if out != journal:  # the Parquet output stands; the journal was only rebuilt to check it
            journal.unlink()
            index.unlink()
        return {**summary, "already_complete": True}
    policy = as_session(engine, session)
    metrics = RolloutMetrics()
    abort_reason = None
    last_flush, unflushed = time.monotonic(), 0
    with JsonlWriter(journal) as records, JsonlWriter(index) as lines:
        async for trajectory in rollout(
            env_id, policy, renderer, parser=parser, n=n, group_size=group_size, config=config,
            concurrency=concurrency, seed=seed, skip=done,
        ):
            entry = IndexEntry.of(trajectory, *records.write(trajectory))
            lines.write_line(entry.to_line())
            metrics.add_digest(entry.digest)
            if trajectory.status is Status.ABORTED:
                abort_reason = trajectory.error
            unflushed += 1
            if unflushed >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
                records.flush()
                lines.flush()
                last_flush, unflushed = time.monotonic(), 0
            if on_trajectory is not None:
                on_trajectory(trajectory, metrics)
    summary = {
        **summarise(index, env_id, n, group_size, metrics),
        "env_id": env_id,
        "new_episodes": metrics.episodes,
        "resumed_episodes": done.count,
        "retried_from_disk": retried,
        "session": {k: v for k, v in asdict(policy.stats).items() if k != "update_wait_s"},
        "output": str(out),
    }
    if abort_reason is not None:
        summary["abort_reason"] = abort_reason
    if out != journal:
        summary["written"] = write_parquet(iter_jsonl(journal), out)
        journal.unlink()
        index.unlink()
    write_text_atomically(metrics_path(out), json.dumps(summary, indent=2))
    return summary
