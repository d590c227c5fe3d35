"""`miles-envs plot`: the learning curves of a real (tiny) `miles-envs train` run as a PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miles_envs.cli.plot import run_curves
from miles_envs.models.factory import init_model


def cli(*args):
    exe = str(Path(sys.executable).with_name("miles-envs"))
    return subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = init_model(tmp_path_factory.mktemp("model"), arch="qwen3", size="tiny")
    out = tmp_path_factory.mktemp("runs") / "seed0"
    result = cli("train", "miles/GuessNumber7-v0", "--model", str(model), "--out", str(out), "--steps", "2",
                 "--sft-warmup", "3", "--sft-batch", "4", "--tasks-per-step", "2", "--group-size", "2",
                 "--max-new-tokens", "3", "--eval-every", "1", "--eval-tasks", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


def test_plot_writes_a_png_of_the_runs_curves(run_dir, tmp_path):
    import matplotlib.image

    curves = run_curves(run_dir)
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [x for x, _ in curves["eval"]] == [0, 1, 2] and [x for x, _ in curves["rollout"]] == [1, 2]
    assert curves["before"] == [(0, evals[0]["eval/reward_mean"])] and len(curves["sft"]) == 3

    png = tmp_path / "plots" / "curve.png"
    result = cli("plot", str(run_dir), str(run_dir), "-o", str(png), "--title", "two runs")
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 300

    default = cli("plot", str(run_dir))
    assert default.returncode == 0 and (run_dir / "curves.png").is_file()


def test_plot_bad_folders_are_clear_errors(tmp_path):
    missing = cli("plot", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such run folder" in missing.stderr
    empty = cli("plot", str(tmp_path))
    assert empty.returncode == 1 and "--out folder of `miles-envs train`" in " ".join(empty.stderr.split())
