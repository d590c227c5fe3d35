"""The index beside a run's journal: one short line per episode record.

Resuming a run, retrying its aborted episodes and summing its metrics read this index, never the
trajectories themselves. A line is ``{"episode", "env", "offset", "length", "digest"}``: where the
record lies in the journal and what the metrics keep of it (``miles_envs.metrics.digest``).

Both files are append-only and written in the same order, the journal flushed first, so the index
describes a prefix of the journal. ``sync_index`` repairs what a crash can leave: index lines past
the journal's end are cut, journal records the index missed are indexed from the journal's tail
(a journal with no index at all is indexed from the start, once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miles_envs.metrics import digest
from miles_envs.trajectory import Trajectory
from miles_envs.trajectory_io import TrajectoryFileError, parse_record, repair_jsonl

COPY_CHUNK = 1 << 20


def index_path(journal: Path) -> Path:
    return Path(journal).with_name(Path(journal).name + ".index")


@dataclass
class IndexEntry:
    episode: str | None
    env: str | None
    offset: int
    length: int
    digest: dict[str, Any]

    @property
    def status(self) -> str:
        return self.digest["status"]

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def of(cls, trajectory: Trajectory, offset: int, length: int) -> IndexEntry:
        return cls(trajectory.episode_id, trajectory.env_id, offset, length, digest(trajectory))

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def iter_index(path: Path) -> Iterator[IndexEntry]:
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield IndexEntry(**json.loads(line))


def sync_index(journal: Path, index: Path) -> None:
    """Make ``index`` describe exactly the records of ``journal`` (see the module docstring)."""
    repair_jsonl(journal)
    repair_jsonl(index)
    size = journal.stat().st_size if journal.exists() else 0
    covered, keep_bytes = 0, 0
    if index.exists():
        with open(index, "rb") as handle:
            for line in handle:
                entry = IndexEntry(**json.loads(line))
                if entry.end > size:
                    break
                covered, keep_bytes = entry.end, keep_bytes + len(line)
        if keep_bytes < index.stat().st_size:
            with open(index, "r+b") as handle:
                handle.truncate(keep_bytes)
    if covered == size:
        return
    existed = index.exists()
    with open(journal, "rb") as source, open(index, "ab") as out:
        source.seek(covered)
        offset = covered
        try:
            for number, line in enumerate(source, 1):
                if line.strip():
                    entry = IndexEntry.of(parse_record(line, journal, number), offset, len(line))
                    out.write(entry.to_line().encode() + b"\n")
                offset += len(line)
        except TrajectoryFileError:  # not ours to index: leave the index as it was
            out.truncate(keep_bytes)
            out.close()
            if not existed:
                index.unlink()
            raise
        out.flush()
        os.fsync(out.fileno())


def compact(journal: Path, index: Path, drop: Callable[[IndexEntry], bool]) -> int:
    """Rewrite journal and index without the records ``drop`` selects; returns how many went.

    Records are copied as bytes (never parsed). The old index is removed before the new journal
    takes its place, so a crash in between leaves a journal that ``sync_index`` re-indexes.
    """
    new_journal, new_index = Path(str(journal) + ".compact"), Path(str(index) + ".compact")
    dropped, offset = 0, 0
    with open(journal, "rb") as source, open(new_journal, "wb") as records, open(new_index, "wb") as lines:
        for entry in iter_index(index):
            if drop(entry):
                dropped += 1
                continue
            source.seek(entry.offset)
            records.write(source.read(entry.length))
            moved = IndexEntry(entry.episode, entry.env, offset, entry.length, entry.digest)
            lines.write(moved.to_line().encode() + b"\n")
            offset += entry.length
        for handle in (records, lines):
            handle.flush()
            os.fsync(handle.fileno())
    index.unlink()
    os.replace(new_journal, journal)
    os.replace(new_index, index)
    return dropped


class GridSet:
    """Which cells of the ``n`` × ``group_size`` grid are done: one byte per cell, keyed like ``episode_key``."""

    def __init__(self, n: int, group_size: int) -> None:
        self.n, self.group_size = n, group_size
        self._cells = bytearray(n * group_size)
        self.count = 0

    def _cell(self, key: str | None) -> int | None:
        task, _, member = (key or "").partition(":")
        if not (task.isdigit() and member.isdigit()):
            return None
        t, m = int(task), int(member)
        return t * self.group_size + m if t < self.n and m < self.group_size else None

    def add(self, key: str | None) -> None:
        cell = self._cell(key)
        if cell is not None and not self._cells[cell]:
            self._cells[cell] = 1
            self.count += 1

    def __contains__(self, key: object) -> bool:
        cell = self._cell(key) if isinstance(key, str) else None
        return cell is not None and bool(self._cells[cell])

    @property
    def full(self) -> bool:
        return self.count == len(self._cells)
