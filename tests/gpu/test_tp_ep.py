"""TP=2 and EP=2 with R3 on two GPUs of one host (NCCL): the experts replayed and the loss of one GPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.marks import GPU, torch

pytestmark = [*GPU, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs of one host")]
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")

REPO = Path(__file__).resolve().parents[2]


def test_tp2_and_ep2_replay_the_trace_and_match_one_gpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "parallel.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               str(REPO / "bench" / "gpu" / "megatron_parallel.py"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    layouts = json.loads(out.read_text())["layouts"]
    for name, entry in layouts.items():
        assert entry["replayed_experts_equal_trace"] and entry["replayed_experts_equal_tp1_ep1"], name
        assert entry["logprob_max_abs_diff_vs_tp1_ep1"] < 1e-3, name
    ep = layouts["tp1_ep2"]
    assert ep["train_step"] and ep["pg_loss_abs_diff_vs_tp1_ep1"] < 1e-3 and ep["mtp/loss_abs_diff_vs_tp1_ep1"] < 1e-3
