"""Streaming pieces of a run: lazy grid, the journal index and its crash repairs, Parquet row groups."""

import asyncio

import pyarrow.parquet as pq

from miles_envs.loop import run_grid
from miles_envs.run_index import GridSet, compact, index_path, iter_index, sync_index
from miles_envs.trajectory import Status, Trajectory
from miles_envs.trajectory_io import JsonlWriter, iter_jsonl, iter_parquet, write_parquet


def trajectory(key, status=Status.COMPLETED):
    return Trajectory(prompt_ids=[1, 2], response_ids=[3], loss_mask=[1], logprobs=[-0.5], env_id="e", episode_id=key,
                      status=status, error=None if status is Status.COMPLETED else "engine aborted the request")


def write_run(journal, statuses, index=True):
    from miles_envs.run_index import IndexEntry

    with JsonlWriter(journal) as records, JsonlWriter(index_path(journal)) as lines:
        for i, status in enumerate(statuses):
            entry = IndexEntry.of(trajectory(f"{i}:0", status), *records.write(trajectory(f"{i}:0", status)))
            if index:
                lines.write_line(entry.to_line())


async def test_grid_cells_start_lazily_and_never_exceed_the_concurrency():
    running, started, peak = set(), [], 0

    async def play(task, member):
        nonlocal peak
        started.append((task, member))
        running.add((task, member))
        peak = max(peak, len(running))
        await asyncio.sleep(0)
        running.discard((task, member))
        return task, member

    stream = run_grid(play, 1000, 2, 3, skip={"0:1"})
    first = await stream.__anext__()
    assert len(started) <= 4 and first == (0, 0)  # not 2,000 coroutines before the first result
    rest = [cell async for cell in stream]
    assert peak == 3 and len(rest) + 1 == 1999 and (0, 1) not in started


def test_index_is_rebuilt_from_the_journal_and_cut_where_the_journal_ends(tmp_path):
    journal = tmp_path / "out.jsonl"
    write_run(journal, [Status.COMPLETED] * 3, index=False)
    index = index_path(journal)
    index.unlink()
    sync_index(journal, index)  # no index: the journal is indexed once
    entries = list(iter_index(index))
    assert [e.episode for e in entries] == ["0:0", "1:0", "2:0"]
    with open(journal, "rb") as handle:
        for entry in entries:
            handle.seek(entry.offset)
            assert Trajectory.from_json(handle.read(entry.length)).episode_id == entry.episode
    # a crash: the index got its last line to disk, the journal lost its last record (torn)
    data = journal.read_bytes()
    journal.write_bytes(data[: entries[-1].offset + 10])
    sync_index(journal, index)
    assert [e.episode for e in iter_index(index)] == ["0:0", "1:0"]
    # the opposite: the journal has a record the index never saw
    with JsonlWriter(journal) as records:
        records.write(trajectory("7:0"))
    sync_index(journal, index)
    assert [e.episode for e in iter_index(index)] == ["0:0", "1:0", "7:0"]


def test_compaction_drops_aborted_records_without_parsing_and_keeps_offsets_true(tmp_path):
    journal = tmp_path / "out.jsonl"
    write_run(journal, [Status.COMPLETED, Status.ABORTED, Status.TRUNCATED, Status.ABORTED])
    index = index_path(journal)
    assert compact(journal, index, lambda e: e.status == "aborted") == 2
    assert [t.episode_id for t in iter_jsonl(journal)] == ["0:0", "2:0"]
    entries = list(iter_index(index))
    assert [(e.episode, e.status) for e in entries] == [("0:0", "completed"), ("2:0", "truncated")]
    assert entries[1].offset == entries[0].end and entries[1].end == journal.stat().st_size


def test_grid_set_marks_cells_of_the_grid_only():
    done = GridSet(3, 2)
    for key in ("0:1", "2:0", "2:0", "5:0", "x", None):
        done.add(key)
    assert done.count == 2 and "0:1" in done and "0:0" not in done and "5:0" not in done and not done.full


def test_parquet_is_written_in_row_groups_and_read_back_losslessly(tmp_path):
    trajectories = [trajectory(f"{i}:0") for i in range(5)]
    out = tmp_path / "out.parquet"
    assert write_parquet(iter(trajectories), out, row_group=2) == 5
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    assert [t.to_dict() for t in iter_parquet(out)] == [t.to_dict() for t in trajectories]
