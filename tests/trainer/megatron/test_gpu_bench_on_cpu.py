"""bench/gpu/megatron_r3_mtp.py at tiny size on CPU: every phase runs and writes its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

from miles_envs.benchrun import megatron_gpu_measures

REPO = Path(__file__).resolve().parents[3]


def run_bench(tmp_path, *options) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "bench" / "gpu" / "megatron_r3_mtp.py"), "--tiny", "--device", "cpu", *options, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=500)
    return result, out


def test_megatron_bench_runs_every_phase_at_tiny_size(tmp_path):
    """Every arm from megatron's own path to the lean one, a micro-batch sweep over two sizes (the
    larger joins two rollout batches per step), the profile and host-read count of every arm."""
    result, out = run_bench(tmp_path, "--arms", "sequential", "grouped", "fused", "lean", "--pairs", "2", "--mfu-steps", "1",
                            "--mfu-micro-tokens", "200", "450", "--sweep-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    arms = ("sequential", "grouped", "fused", "lean")
    sweep_batches = (1 + 1) * 1 + (1 + 1) * 2
    assert report["rollout"]["batches"] == 1 + 4 * 2 + sweep_batches + 2 * 4 + 2 * 3  # every step trains on a batch of its own
    assert "failed" not in report and report["arms"] == list(arms) and report["final_arm"] == "lean"
    for arm in arms:
        steps = report["mfu"][arm]["steps"]
        assert len(steps) == 1 and steps[0]["flops"] > 6 * steps[0]["tokens"]  # at least 6 FLOPs per parameter-token
        assert report["mfu"][arm]["step_seconds_min"] <= report["mfu"][arm]["step_seconds_median"] <= report["mfu"][arm]["step_seconds_max"]
        assert report["profile"][arm]["top_ops"] and report["profile"][arm]["top_host_ops"]
        assert report["host_reads"][arm]["total"] == sum(report["host_reads"][arm]["by_op"].values()) > 0  # CPU: host tensors count too
    # megatron's dispatchers select with masked_select in every MoE layer forward; the device one never does
    assert report["host_reads"]["fused"]["by_op"].get("aten::masked_select", 0) >= 3
    assert "aten::masked_select" not in report["host_reads"]["lean"]["by_op"]
    for fix in ("sequential_over_grouped", "grouped_over_fused", "fused_over_lean"):
        speedup = report["mfu"]["speedup"][fix]
        assert speedup["n"] == 1 and speedup["ratio"] > 0
    small, large = report["micro_batch_sweep"]["points"]
    assert (small["batches_joined"], large["batches_joined"]) == (1, 2)
    for point in (small, large):
        assert len(point["steps"]) == 1 and point["steps"][0]["micro_batches"] == 1
        assert point["tokens_per_micro_batch"] == point["steps"][0]["tokens"]
    assert large["tokens_per_micro_batch"] > 1.5 * small["tokens_per_micro_batch"]
    overhead = report["r3_overhead"]
    assert overhead["ratio_on_over_off"]["n"] == 2 and len(overhead["seconds_on"]) == 2
    low, high = overhead["ratio_on_over_off"]["ci95"]
    assert low <= overhead["ratio_on_over_off"]["ratio"] <= high
    assert len(report["mtp"]["loss_per_step"]) == 1 + 2 * 2
    assert report["r3_overhead_ratio"] == overhead["ratio_on_over_off"]["ratio"]
    measures = {m.name.split(": ", 1)[1]: m.value for m in megatron_gpu_measures(report)}  # the README table reads the file
    assert measures["step time R3 on ÷ off"] == report["r3_overhead_ratio"] and measures["tokens/s, R3 on"] > 0


def test_megatron_bench_time_limit_cuts_loops_short_and_still_writes_every_figure(tmp_path):
    result, out = run_bench(tmp_path, "--pairs", "3", "--mfu-steps", "2", "--mfu-micro-tokens", "200", "--time-limit", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [len(report["mfu"][arm]["steps"]) for arm in ("fused", "lean")] == [1, 1]
    assert report["micro_batch_sweep"]["points"] == [{"micro_tokens_target": 200, "batches_joined": 1, "skipped": "time limit"}]
    assert report["r3_overhead"]["ratio_on_over_off"]["n"] == 1 and report["r3_overhead"]["pairs_planned"] == 3
    assert "profile" not in report and report["r3_overhead_ratio"] > 0


def test_an_arm_that_fails_is_recorded_and_the_others_run_on(tmp_path):
    """The unfused head's logits do not fit (here: a head chunk of 0 tokens is refused when the arm is
    built): the failed arm is in ``failed`` with its error, the other arms' figures are complete."""
    result, out = run_bench(tmp_path, "--arms", "grouped", "lean", "--pairs", "1", "--mfu-steps", "1",
                            "--fail-arm", "grouped")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"]["grouped"]["phase"] == "warm-up" and "MemoryError" in report["failed"]["grouped"]["error"]
    assert "grouped" not in report["mfu"] and len(report["mfu"]["lean"]["steps"]) == 1
    assert report["r3_overhead"]["ratio_on_over_off"]["n"] == 1
