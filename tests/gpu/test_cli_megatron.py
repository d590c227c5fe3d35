"""`miles-envs train --backend megatron` on a GPU, as a user runs it: R3 and MTP-SFT on."""

import json
import subprocess
import sys

import pytest

from tests.gpu.marks import GPU

pytestmark = GPU
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")


def cli(*args):
    # `python -m miles_envs.cli`: a system interpreter puts the script in /usr/local/bin, not beside sys.executable
    result = subprocess.run([sys.executable, "-m", "miles_envs.cli", *args], capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, f"miles-envs {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_train_with_the_megatron_backend_r3_and_mtp_sft(tmp_path):
    model, out = tmp_path / "model", tmp_path / "run"
    cli("init-model", str(model), "--arch", "qwen3-moe", "--size", "tiny", "--mtp", "1")
    cli("train", "miles/Echo-v0", "--backend", "megatron", "--r3", "--mtp-sft", "--model", str(model), "--out", str(out),
        "--steps", "3", "--tasks-per-step", "4", "--group-size", "2", "--max-new-tokens", "16", "--lr", "1e-4",
        "--checkpoint-every", "2", "--device", "cuda")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1.0, 2.0, 3.0]
    for step in steps:
        assert step["trajectories"] == 8.0 and step["grad_norm"] > 0
        assert step["mtp/loss"] > 0 and "mismatch/router_disagreement" in step
    assert steps[0]["mismatch/router_disagreement"] < 0.05  # replayed: the trainer routes as the rollout did
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (latest / "model" / "mtp.safetensors").is_file()  # the MTP draft travels with the weights
