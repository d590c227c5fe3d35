"""Smoke tests: each co-evolution script finishes on CPU at CI size and writes its metrics and curves."""

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


def run(script, tmp_path, *args):
    out, results = tmp_path / "run", tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--iterations", "2", "--out", str(out), "--results", str(results), *args],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    name = f"{Path(script).stem}_seed0"
    curves = json.loads((results / f"{name}.json").read_text())
    assert (results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result.stdout, metrics, curves, read_trajectories(out / "trajectories.jsonl")


def test_selfplay_scripted_is_rollout_only(tmp_path):
    stdout, metrics, curves, trajectories = run(
        "selfplay_tictactoe.py", tmp_path, "--engine", "scripted", "--games", "4", "--eval-games", "40", "--eval-every", "1",
        "--mid-eval-games", "10", "--pool-hardness", "2", "--greedy-too",
    )
    assert "rollout-only" in stdout and metrics["config"]["trained"] is False
    rows = metrics["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1] and [r["pool"] for r in rows] == [1, 2]
    assert all(0.0 <= r["win_rate"] <= 1.0 and r["illegal_rate"] == 0.0 for r in rows)
    # random legal movers finish every game: both seats move, so two trajectories per episode
    assert len(trajectories) == 2 * 4 * 2 == sum(r["trajectories"] for r in rows)
    assert {t.metadata["policy"] for t in trajectories} >= {"learner", "pool:scripted-0"}
    # nothing trains: every evaluation replays the same fixed seeds, so the curve is flat
    assert [(e["iteration"], e["phase"]) for e in curves["evals"]] == [(0, "start"), (1, "self_play"), (2, "end")]
    # the lift is measured on full-size evaluations; the one in between is cheaper
    assert [e["random"]["games"] for e in curves["evals"]] == [40, 10, 40]
    assert curves["summary"]["random"]["lift_points"] == 0.0 == curves["summary"]["one_ply"]["lift_points"]
    assert curves["summary"]["random"]["games"] == [40, 40] and curves["summary"]["random"]["end_phase"] == "end"
    # the greedy learner is evaluated where the lift is measured only; a scripted mover ignores the temperature
    assert ["greedy" in e for e in curves["evals"]] == [True, False, True]
    assert curves["summary"]["greedy"]["random"] == curves["summary"]["random"]
    start = curves["evals"][0]
    assert start["random"]["forfeit"] == 0.0 and start["random"]["games"] == 40
    low, high = start["random"]["win_draw_ci95"]
    assert low <= start["random"]["win_draw"] <= high
    # blocking and taking wins beats a random mover far more often than a random mover does
    assert start["one_ply"]["win_draw"] < start["random"]["win_draw"]


def test_selfplay_random_share_trains_against_the_random_player_not_the_pool(tmp_path):
    _, metrics, _, trajectories = run(
        "selfplay_tictactoe.py", tmp_path, "--engine", "scripted", "--games", "4", "--eval-games", "2", "--random-share", "1",
    )
    opponents = {t.metadata["policy"] for t in trajectories} - {"learner"}
    assert opponents == {"random"}
    rows = metrics["iterations"]
    assert all(r["win_rate_random"] == r["win_rate"] and r["pool_win_rates"] == {} for r in rows)


def test_selfplay_random_share_above_one_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "selfplay_tictactoe.py"), "--random-share", "1.5", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "argument --random-share: 1.5: must be <= 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_proposer_solver_scripted_scores_split_problems(tmp_path):
    _, metrics, curves, trajectories = run(
        "proposer_solver.py", tmp_path, "--engine", "scripted", "--games", "6", "--eval-games", "12"
    )
    rows = metrics["iterations"]
    assert all(r["valid_rate"] == 1.0 for r in rows)
    assert all(0.0 <= r["solver_success"] <= 1.0 and 1 <= r["operators"] <= 3 for r in rows)
    assert {t.metadata["role"] for t in trajectories} == {"proposer", "solver"}
    assert len(trajectories) == 2 * 6 * 5
    held_out = curves["evals"][-1]
    assert held_out["problems"] == 12 and set(held_out["by_operators"]) <= {"1", "2", "3", "4"}
    assert curves["summary"]["held_out_start"] == curves["evals"][0]["accuracy"]
    tracking = curves["summary"]["tracking"]
    assert tracking["iterations"] == 2 and tracking["correlation"] is None  # two points: no correlation claimed
    assert tracking["operators"] == [round(sum(r["operators"] for r in rows) / 2, 3)] * 2


@needs_embedded
@pytest.mark.parametrize("script, extra", [
    # a one-snapshot pool: the second snapshot reuses the first one's engine
    ("selfplay_tictactoe.py", ["--pool-size", "1", "--pool-hardness", "1"]),
    ("proposer_solver.py", ["--solvers", "2"]),
])
def test_embedded_engine_warm_starts_then_trains_between_iterations(tmp_path, script, extra):
    _, metrics, curves, trajectories = run(
        script, tmp_path, "--engine", "embedded", "--games", "2", "--max-new-tokens", "4",
        "--warmup-games", "2", "--warmup-steps", "2", "--eval-games", "2", "--minibatches", "2", *extra,
    )
    assert metrics["config"]["trained"] is True
    assert [r["version"] for r in metrics["iterations"]] == ["step-1", "step-2"]
    assert all("train/loss" in r for r in metrics["iterations"])
    assert len(curves["warm_start"]) == 2 and all(s["sft/loss"] > 0 for s in curves["warm_start"])
    assert [e["phase"] for e in curves["evals"]][:2] == ["init", "start"]
    versions = {turn.weight_version for t in trajectories for turn in t.turns if turn.kind == "model"}
    assert {"sft", "step-1"} <= versions  # the first iteration played the warm start, the second the updated weights
    assert all(r["train/step"] == i + 1 for i, r in enumerate(metrics["iterations"]))
    if script.startswith("selfplay"):
        opponents = [{t.metadata["policy"] for t in trajectories if t.metadata["iteration"] == i} - {"learner"} for i in (0, 1)]
        assert opponents == [{"pool:step-0"}, {"pool:step-1"}]


def test_time_budget_stops_iterating_and_still_evaluates(tmp_path):
    _, metrics, curves, _ = run(
        "selfplay_tictactoe.py", tmp_path, "--engine", "scripted", "--games", "2", "--eval-games", "2",
        "--eval-every", "10", "--time-budget-s", "0",
    )
    assert [r["iteration"] for r in metrics["iterations"]] == [0]
    assert [e["iteration"] for e in curves["evals"]] == [0, 1]


@pytest.mark.parametrize("script, flag, value", [
    ("selfplay_tictactoe.py", "--eval-games", "0"),
    ("selfplay_tictactoe.py", "--time-budget-s", "-5"),
    ("proposer_solver.py", "--solvers", "0"),
])
def test_out_of_range_options_are_refused_before_any_work(tmp_path, script, flag, value):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), flag, value, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and f"argument {flag}: {value}: must be >=" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_proposer_solver_difficulty_weighted_pays_by_operators(tmp_path):
    _, metrics, _, trajectories = run(
        "proposer_solver.py", tmp_path, "--engine", "scripted", "--games", "6", "--eval-games", "4", "--difficulty-weighted",
        "--max-operators", "3",
    )
    assert metrics["config"]["difficulty_weighted"] == "True"
    proposers = [t for t in trajectories if t.metadata["role"] == "proposer"]
    assert len(proposers) == 12
    for t in proposers:
        parts = t.reward_components
        assert t.reward == pytest.approx(parts["learnability"] * parts["difficulty"])
        assert parts["difficulty"] in (1 / 3, 2 / 3, 1.0)


def test_proposer_tracking_correlates_difficulty_with_success():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from proposer_solver import tracking
    finally:
        sys.path.remove(str(SCRIPTS))
    rows = [{"operators": 1.0 + i / 10, "solver_success": 0.2 + i / 20} for i in range(8)]
    rows.insert(3, {"operators": None, "solver_success": None})  # an iteration without a valid problem
    result = tracking(rows, window=2)
    assert result == {"operators": [1.05, 1.65], "solver_success": [0.225, 0.525], "correlation": 1.0, "iterations": 8}
    flat = [{"operators": 1.0, "solver_success": s} for s in (0.1, 0.3, 0.5)]
    assert tracking(flat)["correlation"] is None
