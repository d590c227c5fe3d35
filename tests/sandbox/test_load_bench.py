"""bench/sandbox_load.py at a small size, through the bench runner: every session completes, nothing
is left behind, and the runner reads its results."""

from __future__ import annotations

import json

from miles_envs.benchrun import run_benches, select


def test_small_load_run_has_no_failures_or_leftovers(tmp_path):
    (outcome,) = run_benches(select(["sandbox_load"]), tmp_path, quick=True, timeout=600)
    assert outcome.status == "ran", outcome.detail
    data = json.loads((tmp_path / "sandbox_load.json").read_text())
    (row,) = data["rows"]
    assert (row["backend"], row["sessions"]) == ("local", 32)
    assert row["start_failures"] == 0 and row["exec_failures"] == 0
    assert row["leftovers_by_kind"] == {"processes": 0, "containers": 0, "mounts": 0, "temp_dirs": 0, "cgroups": 0}
    (cell,) = data["cells"]
    assert cell["execs"] == 32 * 4 and cell["starts"] == min(32, cell["pool_size"])
    names = [m.name for m in outcome.measures]
    assert names == ["sandbox load, local, 32 concurrent sessions: exec p99",
                     "sandbox load, local, 32 concurrent sessions: start failures",
                     "sandbox load, local, 32 concurrent sessions: leftovers after the run"]
    assert [m.met for m in outcome.measures[1:]] == [True, True]
