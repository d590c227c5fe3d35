"""TP=2 and EP=2 against one rank's layout, two gloo processes on CPU (the GPU run uses NCCL)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_and_ep2_replay_the_trace_and_match_one_rank(tmp_path):
    out = tmp_path / "parallel.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               str(REPO / "bench" / "gpu" / "megatron_parallel.py"), "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    layouts = json.loads(out.read_text())["layouts"]
    assert set(layouts) == {"tp1_ep1", "tp2_ep1", "tp1_ep2"}
    for name, entry in layouts.items():
        assert entry["replayed_experts_equal_trace"] and entry["replayed_experts_equal_tp1_ep1"], name
        assert entry["logprob_max_abs_diff_vs_tp1_ep1"] < 1e-5, name
    ep = layouts["tp1_ep2"]
    assert ep["train_step"] and ep["pg_loss_abs_diff_vs_tp1_ep1"] < 1e-5 and ep["mtp/loss_abs_diff_vs_tp1_ep1"] < 1e-5
