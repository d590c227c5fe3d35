"""Reading the trajectories a page shows.

``miles_envs.trajectory_io.read_trajectories`` (JSONL and Parquet) is the one reader of trajectory
files; until that module is present, JSONL is read here with ``Trajectory.from_json``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from miles_envs.trajectory import Trajectory


def load_trajectories(path: str | Path) -> list[Trajectory]:
    """All trajectories of a ``.jsonl`` file (or ``.parquet`` once ``trajectory_io`` exists)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectory file at {path}")
    if importlib.util.find_spec("miles_envs.trajectory_io") is not None:
        from miles_envs.trajectory_io import read_trajectories

        return list(read_trajectories(path))
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: only JSONL trajectory files (one Trajectory.to_json() per line) can be read here")
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[Trajectory]:
    trajectories = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                trajectories.append(Trajectory.from_json(line))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a Trajectory.to_json() line: {exc}") from exc
    return trajectories
