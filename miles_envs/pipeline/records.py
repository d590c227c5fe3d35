"""A run's folder: per-step records, checkpoints holding the loop's own state, resume and trims.

Metrics go to ``out_dir/metrics.jsonl`` (one JSON object per step) and a checkpoint is written every
``checkpoint_every`` steps; a run restarted with the same ``out_dir`` resumes from the newest
checkpoint, and the step records written after that checkpoint (steps the killed run did not save)
are cut, so every step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miles_envs.atomic import write_text_atomically
from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, load_run_state, save_checkpoint
from miles_envs.trajectory import Trajectory

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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line torn by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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

    def resume(self, trainer: Any) -> dict[str, Any] | None:
        """Load the newest checkpoint into ``trainer`` (if any), cut later step records, and return
        the run state saved with it. Returns ``None`` for a fresh run."""
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return None
        load_checkpoint(trainer, path)
        trim_jsonl(self.out / METRICS_FILE, trainer.step)
        return load_run_state(path) or {}

    def record(self, trainer: Any, metrics: dict[str, Any], last_step: int, run_state: dict[str, Any] | None = None) -> None:
        """Append the step's record, then checkpoint when due (a kill in between is cut on resume)."""
        with (self.out / METRICS_FILE).open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if trainer.step % self.checkpoint_every == 0 or trainer.step == last_step:
            save_checkpoint(trainer, self.checkpoints, keep=self.keep, run_state=run_state)
