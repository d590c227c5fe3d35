"""`miles-envs rollout`: output formats, metrics beside the output, and crash-safe resume."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


from miles_envs.trajectory import Status
from miles_envs.trajectory_io import read_trajectories
from tests.conftest import run_cli

N, GROUP = 300, 2


def rollout_args(out, n=N):
    return ["rollout", "miles/GuessNumber-v0", "--engine", "scripted", "-n", str(n), "--group-size", str(GROUP),
            "-o", str(out), "--concurrency", "8", "--tokenizer", "qwen2_5"]


def test_sigkill_mid_run_then_rerun_gives_exactly_n_episodes(tmp_path):
    out = tmp_path / "out.jsonl"
    exe = Path(sys.executable).with_name("miles-envs")
    proc = subprocess.Popen([str(exe), *rollout_args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 200_000):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: raise N"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes().count(b"\n")
    assert 0 < partial < N * GROUP

    result = run_cli(*rollout_args(out))
    episodes = read_trajectories(out)
    keys = Counter(t.episode_id for t in episodes)
    assert len(episodes) == N * GROUP and max(keys.values()) == 1
    assert set(keys) == {f"{i}:{j}" for i in range(N) for j in range(GROUP)}
    for t in episodes:
        t.validate()
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert metrics["resumed_episodes"] >= partial - 1 and metrics["new_episodes"] == N * GROUP - metrics["resumed_episodes"]
    assert metrics["episodes"] == N * GROUP  # the metrics describe the whole output, resumed part included
    assert "trajectories" in result.stderr


def test_parquet_output_and_resume(tmp_path):
    out = tmp_path / "out.parquet"
    run_cli(*rollout_args(out, n=4))
    first = read_trajectories(out)
    assert len(first) == 4 * GROUP and all(t.status is Status.COMPLETED or t.status is Status.TRUNCATED for t in first)
    assert not (tmp_path / "out.parquet.journal.jsonl").exists()
    run_cli(*rollout_args(out, n=6))
    second = read_trajectories(out)
    assert len(second) == 6 * GROUP
    assert {t.id for t in first} <= {t.id for t in second}


def test_bad_input_fails_fast(tmp_path):
    result = run_cli("rollout", "miles/GuessNumbr-v0", "-o", str(tmp_path / "x.jsonl"), check=False)
    assert result.returncode == 1 and "did you mean: miles/GuessNumber-v0" in result.stderr
    result = run_cli("rollout", "miles/Echo-v0", "-o", str(tmp_path / "x.csv"), check=False)
    assert result.returncode == 1 and ".jsonl or .parquet" in result.stderr
    result = run_cli("rollout", "miles/Echo-v0", "--engine", "tcp://x", "-o", str(tmp_path / "x.jsonl"), check=False)
    assert result.returncode == 1 and "scripted" in result.stderr


def test_metrics_sinks_receive_the_run(tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli(*rollout_args(out, n=3), "--log", f"json:{tmp_path / 'metrics.jsonl'}", "--log-every", "2")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 6]
    assert lines[-1]["episodes"] == 3 * GROUP and lines[-1]["completed_rate"] == 1.0
