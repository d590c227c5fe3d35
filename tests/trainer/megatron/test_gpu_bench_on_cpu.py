"""bench/gpu/megatron_r3_mtp.py at tiny size on CPU: every phase runs and writes its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

from miles_envs.benchrun import megatron_gpu_measures

REPO = Path(__file__).resolve().parents[3]


def test_megatron_bench_runs_every_phase_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "bench" / "gpu" / "megatron_r3_mtp.py"), "--tiny", "--device", "cpu",
               "--pairs", "2", "--mfu-steps", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rollout"]["batches"] == 1 + 3 * 3 + 2 * 3  # every step trains on a batch of its own
    for arm in ("sequential", "grouped", "fused"):
        steps = report["mfu"][arm]["steps"]
        assert len(steps) == 1 and steps[0]["flops"] > 6 * steps[0]["tokens"]  # at least 6 FLOPs per parameter-token
        assert report["mfu"][arm]["step_seconds_min"] <= report["mfu"][arm]["step_seconds_median"] <= report["mfu"][arm]["step_seconds_max"]
        assert report["profile"][arm]["top_ops"] and report["profile"][arm]["top_host_ops"]
    for fix in ("sequential_over_grouped", "grouped_over_fused"):
        speedup = report["mfu"]["speedup"][fix]
        assert speedup["n"] == 1 and speedup["ratio"] > 0
    overhead = report["r3_overhead"]
    assert overhead["ratio_on_over_off"]["n"] == 2 and len(overhead["seconds_on"]) == 2
    low, high = overhead["ratio_on_over_off"]["ci95"]
    assert low <= overhead["ratio_on_over_off"]["ratio"] <= high
    assert len(report["mtp"]["loss_per_step"]) == 1 + 2 * 2
    assert report["r3_overhead_ratio"] == overhead["ratio_on_over_off"]["ratio"]
    measures = {m.name.split(": ", 1)[1]: m.value for m in megatron_gpu_measures(report)}  # the README table reads the file
    assert measures["step time R3 on ÷ off"] == report["r3_overhead_ratio"] and measures["tokens/s, R3 on"] > 0


def test_megatron_bench_time_limit_cuts_loops_short_and_still_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "bench" / "gpu" / "megatron_r3_mtp.py"), "--tiny", "--device", "cpu",
               "--pairs", "3", "--mfu-steps", "2", "--time-limit", "0", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [len(report["mfu"][arm]["steps"]) for arm in ("sequential", "grouped", "fused")] == [1, 1, 1]
    assert report["r3_overhead"]["ratio_on_over_off"]["n"] == 1 and report["r3_overhead"]["pairs_planned"] == 3
    assert "profile" not in report and report["r3_overhead_ratio"] > 0
