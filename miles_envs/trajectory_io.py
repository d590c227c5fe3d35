"""Reading and writing trajectory files: JSONL (append-only, crash-safe) and Parquet (columnar).

A run writes JSONL as it goes, flushed and fsynced per batch, so a killed run loses at most the
batch in flight and a rerun skips what is on disk. Parquet output is streamed from that journal in
row groups when the run finishes (``out.parquet`` ← ``out.parquet.journal.jsonl``), since Parquet
files cannot be appended to safely; memory stays flat whatever the run's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from miles_envs.trajectory import Trajectory, Turn

JOURNAL_SUFFIX = ".journal.jsonl"


def journal_path(path: Path) -> Path:
    """Where episodes are appended while a run is in flight."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path.with_name(path.name + JOURNAL_SUFFIX)


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (a crash mid-write); returns how many bytes were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    return len(data) - keep


class TrajectoryFileError(ValueError):
    """A file that should hold trajectories holds something else."""


def parse_record(line: str | bytes, path: Path, number: int) -> Trajectory:
    """Line ``number`` of ``path`` as a Trajectory, or a ``TrajectoryFileError`` naming the line."""
    try:
        return Trajectory.from_json(line)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError) as exc:
        raise TrajectoryFileError(f"{path}:{number}: not a trajectory record ({exc})") from exc


def iter_jsonl(path: Path) -> Iterator[Trajectory]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield parse_record(line, path, number)


class JsonlWriter:
    """Append-only writer; ``flush()`` makes everything written so far durable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self._handle = open(self.path, "ab")
        self.offset = self._handle.seek(0, os.SEEK_END)

    def write(self, trajectory: Trajectory) -> tuple[int, int]:
        """Append one record; returns its (byte offset, byte length) in the file."""
        return self.write_line(trajectory.to_json())

    def write_line(self, text: str) -> tuple[int, int]:
        data = text.encode("utf-8") + b"\n"
        self._handle.write(data)
        start, self.offset = self.offset, self.offset + len(data)
        return start, len(data)

    def flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self.flush()
            self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Parquet ----------------------------------------------------------------------------------------
_JSON_COLUMNS = ("messages", "reward_components", "metadata", "turns")


def _row(t: Trajectory) -> dict[str, Any]:
    d = t.to_dict()
    routed = t.routed_experts
    row = {k: v for k, v in d.items() if k not in _JSON_COLUMNS and k != "routed_experts"}
    for key in _JSON_COLUMNS:
        row[key] = json.dumps(d[key], ensure_ascii=False)
    row["routed_experts"] = None if routed is None else np.ascontiguousarray(routed).tobytes()
    row["routed_shape"] = None if routed is None else list(routed.shape)
    row["routed_dtype"] = None if routed is None else routed.dtype.str
    return row


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("env_id", pa.string()), ("group_id", pa.string()), ("agent_id", pa.string()),
        ("episode_id", pa.string()), ("seed", pa.int64()), ("status", pa.string()), ("error", pa.string()),
        ("reward", pa.float64()), ("prompt_ids", pa.list_(pa.int64())), ("response_ids", pa.list_(pa.int64())),
        ("loss_mask", pa.list_(pa.int8())), ("logprobs", pa.list_(pa.float64())), ("flags", pa.list_(pa.string())),
        ("messages", pa.string()), ("reward_components", pa.string()), ("metadata", pa.string()),
        ("turns", pa.string()), ("routed_experts", pa.binary()), ("routed_shape", pa.list_(pa.int64())),
        ("routed_dtype", pa.string()),
    ])


ROW_GROUP = 1024


def write_parquet(trajectories: Iterable[Trajectory], path: Path, row_group: int = ROW_GROUP) -> int:
    """Stream trajectories into a Parquet file, ``row_group`` rows at a time (memory stays flat)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = Path(str(path) + ".tmp")
    written, rows = 0, []
    with pq.ParquetWriter(tmp, _schema()) as writer:
        for trajectory in trajectories:
            rows.append(_row(trajectory))
            if len(rows) == row_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=_schema()))
                written, rows = written + len(rows), []
        if rows or not written:
            writer.write_table(pa.Table.from_pylist(rows, schema=_schema()))
            written += len(rows)
    os.replace(tmp, path)
    return written


def iter_parquet(path: Path) -> Iterator[Trajectory]:
    """One row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TrajectoryFileError(f"{path}: not a trajectory Parquet file ({exc})") from exc
    for batch in table.iter_batches():
        for row in batch.to_pylist():
            for key in _JSON_COLUMNS:
                row[key] = json.loads(row[key])
            raw, shape, dtype = row.pop("routed_experts"), row.pop("routed_shape"), row.pop("routed_dtype")
            row["turns"] = [Turn(**turn) for turn in row["turns"]]
            row["routed_experts"] = None if raw is None else np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
            yield Trajectory(**row)


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """Load a ``.jsonl`` or ``.parquet`` trajectory file."""
    path = Path(path)
    if path.suffix == ".parquet":
        return list(iter_parquet(path))
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    raise ValueError(f"{path}: unknown trajectory format; use a .jsonl or .parquet file")
