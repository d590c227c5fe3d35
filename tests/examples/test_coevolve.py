"""Smoke tests: each co-evolution script finishes on CPU at CI size and writes its metrics."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miles_envs.trajectory_io import read_trajectories

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "examples" / "coevolve"
needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("miles_envs.agents.embedded") is None, reason="the embedded engine is not installed"
)


def run(script, out, *args):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--iterations", "2", "--out", str(out), *args],
        capture_output=True, text=True, cwd=out.parent, env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    return result.stdout, metrics, read_trajectories(out / "trajectories.jsonl")


def test_selfplay_scripted_is_rollout_only(tmp_path):
    stdout, metrics, trajectories = run("selfplay_tictactoe.py", tmp_path / "run", "--engine", "scripted", "--games", "4")
    assert "rollout-only" in stdout and metrics["config"]["trained"] is False
    rows = metrics["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1] and [r["pool"] for r in rows] == [1, 2]
    assert all(0.0 <= r["win_rate"] <= 1.0 and r["illegal_rate"] == 0.0 for r in rows)
    # random legal movers finish every game: both seats move, so two trajectories per episode
    assert len(trajectories) == 2 * 4 * 2 == sum(r["trajectories"] for r in rows)
    assert {t.metadata["policy"] for t in trajectories} >= {"learner", "pool:scripted-0"}


def test_proposer_solver_scripted_scores_split_problems(tmp_path):
    _, metrics, trajectories = run("proposer_solver.py", tmp_path / "run", "--engine", "scripted", "--games", "6")
    rows = metrics["iterations"]
    assert all(r["valid_rate"] == 1.0 for r in rows)
    assert all(0.0 <= r["solver_accuracy"] <= 1.0 and 0.0 <= r["difficulty"] <= 1.0 for r in rows)
    assert {t.metadata["role"] for t in trajectories} == {"proposer", "solver"}
    assert len(trajectories) == 2 * 6 * 5


@needs_embedded
@pytest.mark.parametrize("script, extra", [("selfplay_tictactoe.py", []), ("proposer_solver.py", ["--solvers", "2"])])
def test_embedded_engine_trains_between_iterations(tmp_path, script, extra):
    _, metrics, trajectories = run(script, tmp_path / "run", "--engine", "embedded", "--games", "2", "--max-new-tokens", "4", *extra)
    assert metrics["config"]["trained"] is True
    assert [r["version"] for r in metrics["iterations"]] == ["step-1", "step-2"]
    assert all("train/loss" in r for r in metrics["iterations"])
    versions = {turn.weight_version for t in trajectories for turn in t.turns if turn.kind == "model"}
    assert {"step-0", "step-1"} <= versions  # the second iteration played the updated weights
