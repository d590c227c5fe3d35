"""`miles-envs train`: the demo path (warm start, RL, eval, logs, summary) and resume after SIGKILL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles_envs.models.factory import init_model

STEPS = 4


def train_args(model, out, *extra):
    return ["miles/Echo-v0", "--model", str(model), "--out", str(out), "--steps", str(STEPS), "--sft-warmup", "3",
            "--sft-batch", "4", "--tasks-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-3",
            "--eval-every", "2", "--eval-tasks", "4", "--checkpoint-every", "1", "--device", "cpu", *extra]


def command(*args):
    """The real ``miles-envs train`` console script, in a fresh process."""
    return [str(Path(sys.executable).with_name("miles-envs")), "train", *args]


def run_train(*args, check=True):
    result = subprocess.run(command(*args), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"train {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), arch="qwen3", size="tiny")


def test_sigkill_mid_run_then_rerun_resumes_from_the_checkpoint(model, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(*train_args(model, out, "--log", "tensorboard")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() not in ("", "step_000000"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: raise STEPS"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().removeprefix("step_"))
    assert 1 <= killed_at < STEPS
    assert len(read_jsonl(out / "sft.jsonl")) == 3

    result = run_train(*train_args(model, out, "--progress-every", "0"))
    assert len(read_jsonl(out / "sft.jsonl")) == 3  # the warm start is in the checkpoint: not redone
    steps = [int(m["step"]) for m in read_jsonl(out / "metrics.jsonl")]
    # records the killed run wrote after its checkpoint are cut before the steps are redone
    assert steps == list(range(1, STEPS + 1))
    assert latest.read_text().strip() == f"step_{STEPS:06d}"
    # no terminal: plain progress lines, one per step with --progress-every 0
    assert f"resuming at RL step {killed_at}/{STEPS} (warm start done)" in result.stderr
    assert all(f"RL step {k}/{STEPS}  reward" in result.stderr for k in range(killed_at + 1, STEPS + 1))

    evals = read_jsonl(out / "eval.jsonl")
    assert evals[0]["phase"] == "before_warmup" and evals[0]["step"] == 0
    assert [e["step"] for e in evals if e["phase"] == "rl"][-1] == STEPS
    assert all(0.0 <= e["eval/reward_mean"] <= 1.0 for e in evals)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps_done"] == STEPS and summary["env_id"] == "miles/Echo-v0"
    assert summary["eval_reward_end"] == evals[-1]["eval/reward_mean"]
    assert summary["eval_reward_before_warmup"] == evals[0]["eval/reward_mean"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert '"steps_done": 4' in result.stderr

    again = run_train(*train_args(model, out))  # a finished run: says so, trains and rewrites nothing
    assert "already complete" in again.stderr and "Traceback" not in again.stderr
    assert [int(m["step"]) for m in read_jsonl(out / "metrics.jsonl")] == steps
    assert read_jsonl(out / "eval.jsonl") == evals and latest.read_text().strip() == f"step_{STEPS:06d}"


def test_lora_training_serves_the_adapter_by_name(model, tmp_path):
    out = tmp_path / "lora"
    run_train(*train_args(model, out, "--lora", "4"))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps_done"] == STEPS
    assert (out / "serving" / "adapter" / "adapter_config.json").is_file()
    checkpoint = out / "checkpoints" / f"step_{STEPS:06d}" / "model"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()


def test_configuration_errors_are_clear(model, tmp_path):
    unknown = run_train(*train_args(model, tmp_path / "a")[1:], check=False)  # no env id
    assert unknown.returncode != 0
    typo = run_train("miles/Ech-v0", *train_args(model, tmp_path / "b")[1:], check=False)
    assert typo.returncode == 1 and "miles/Echo-v0" in typo.stderr
    backend = run_train(*train_args(model, tmp_path / "c", "--backend", "jax"), check=False)
    assert backend.returncode == 1 and "unknown backend 'jax'" in backend.stderr
    no_demo = run_train("miles/ToolCalc-v0", *train_args(model, tmp_path / "d")[1:], check=False)
    assert no_demo.returncode == 1 and "no demonstration" in no_demo.stderr


def test_backend_dispatch_and_the_megatron_error_when_megatron_core_is_missing_simulated(monkeypatch):
    """megatron-core may be installed here, so its absence is simulated by hiding it from find_spec."""
    import importlib.util

    from miles_envs.pipeline.settings import BackendUnavailable, load_backend

    assert load_backend("torch").__name__ == "Trainer"
    if importlib.util.find_spec("megatron.core") is not None:
        assert load_backend("megatron").__name__ == "MegatronTrainer"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("megatron") else real_find_spec(name, *a))
    with pytest.raises(BackendUnavailable, match="needs megatron-core"):
        load_backend("megatron")


@pytest.mark.parametrize("schedule", [(), ("--async", "--max-staleness", "0")], ids=["sync", "async"])
def test_ray_rollout_workers_on_a_local_cluster(model, tmp_path, schedule):
    """`--ray 2`: rollouts on two Ray actors with their own embedded engines, weights synced each step
    (asynchronously: groups stream from the workers; staleness 0 keeps every token on-policy)."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    args = train_args(model, out, "--ray", "2", *schedule)
    args[args.index("--steps") + 1] = "2"
    run_train(*args)
    steps = read_jsonl(out / "metrics.jsonl")
    assert [int(m["step"]) for m in steps] == [1, 2]
    assert all(m["trajectories"] == 4 for m in steps)
    # the workers sample from the trainer's weights (warm-started, so unlike --model): synced each step
    assert all(m["mismatch/mean_abs_delta"] < 1e-4 for m in steps)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps_done"] == 2 and summary["settings"]["ray_workers"] == 2


def async_args(model, out, steps):
    return ["miles/Echo-v0", "--model", str(model), "--out", str(out), "--steps", str(steps), "--tasks-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--checkpoint-every", "1", "--device", "cpu",
            "--async", "--max-staleness", "3", "--on-stale", "resample"]


def test_async_run_killed_and_resumed_neither_loses_nor_repeats_a_group(model, tmp_path):
    out, steps = tmp_path / "async", 6
    proc = subprocess.Popen(command(*async_args(model, out, steps)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_000002":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: raise steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = out / "checkpoints" / latest.read_text().strip()
    killed_at = int(killed.name.removeprefix("step_"))
    at_kill = json.loads((killed / "run_state.json").read_text())["groups"]
    in_flight_at_kill = set(range(at_kill["settled_below"], at_kill["issued"])) - set(at_kill["settled"])
    assert in_flight_at_kill, "nothing was in flight at the checkpoint: the replay was not exercised"

    result = run_train(*async_args(model, out, steps))
    records = read_jsonl(out / "metrics.jsonl")
    assert [int(m["step"]) for m in records] == list(range(1, steps + 1))
    trained = [g for m in records for g in m["groups"]]
    assert len(trained) == len(set(trained)) == 2 * steps  # no group twice
    after_kill = {g for m in records[killed_at:] for g in m["groups"]}
    end = json.loads((out / "checkpoints" / f"step_{steps:06d}" / "run_state.json").read_text())["groups"]
    still_in_flight = set(range(end["settled_below"], end["issued"])) - set(end["settled"])
    assert in_flight_at_kill <= after_kill | still_in_flight  # every group in flight at the kill was played again
    # nothing lost: every group handed out was trained on or is still to be played (resample drops none)
    assert set(trained) | still_in_flight == set(range(end["issued"])) and not set(trained) & still_in_flight
    assert all(m["staleness/trajectories_max"] <= 3 for m in records)
    assert f"resuming at RL step {killed_at}/{steps}" in result.stderr


BAD_INPUTS = [
    (("--async", "--max-staleness", "-1"), "--max-staleness -1: give a whole number of versions >= 0"),
    (("--max-staleness", "2"), "--max-staleness set the asynchronous schedule: add --async"),
    (("--async", "--engine", "sglang://127.0.0.1:9", "--lora", "2"), "drop --lora or --async"),
    (("--staleness-decay", "0"), "--staleness-decay 0.0: must be in (0, 1]"),
    (("--model", "MISSING"), "does not exist: give an HF checkpoint folder"),
    (("--out", "FILE/run"), "cannot be created"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_INPUTS])
def test_bad_input_fails_before_any_work_with_a_clear_message(model, tmp_path, extra, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    extra = [str(tmp_path / e) if e in ("MISSING", "FILE/run") else e for e in extra]
    out = tmp_path / "run"
    args = [*train_args(model, out), *extra]
    for flag in ("--model", "--out"):  # a later copy of an option wins: drop the earlier one
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    result = run_train(*args, check=False)
    assert result.returncode == 1, result.stderr
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not out.exists()


def test_an_engine_address_where_no_server_answers_fails_with_one_clear_message(model, tmp_path):
    with socket.socket() as probe:  # a port just closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_train(*train_args(model, tmp_path / "run", "--engine", f"sglang://127.0.0.1:{port}"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--engine sglang://127.0.0.1:{port}: no SGLang server answered there" in " ".join(result.stderr.split())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: the refusal is for machines without")
def test_megatron_backend_without_a_gpu_is_refused_before_any_work(model, tmp_path):
    result = run_train(*train_args(model, tmp_path / "run", "--backend", "megatron"), check=False)
    assert result.returncode == 1 and "--backend megatron trains on CUDA GPUs" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_serving_checkpoints_keep_only_the_newest(tmp_path):
    from miles_envs.pipeline.weights import prune_serving

    for step in (1, 2, 9, 10, 11):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "adapter").mkdir()
    prune_serving(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "step-10", "step-11"]  # by number, not by name


def test_a_resumed_run_continues_its_wandb_run(model, tmp_path):
    """W&B in offline mode (no account here): each run writes ``wandb/offline-run-<time>-<id>``."""
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    args = ["miles/Echo-v0", "--model", str(model), "--out", str(out), "--tasks-per-step", "1", "--group-size", "2",
            "--max-new-tokens", "4", "--checkpoint-every", "1", "--device", "cpu", "--log", "wandb:miles-envs-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for steps in ("1", "2"):
        result = subprocess.run(command(*args, "--steps", steps), capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def test_megatron_backend_refuses_the_torch_warm_start_before_any_work_gpu_simulated(tmp_path, monkeypatch):
    """The check comes after the GPU check, so a visible GPU is simulated."""
    import torch

    from miles_envs.pipeline import TrainSettings
    from miles_envs.pipeline.settings import check_settings

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = TrainSettings(env_id="miles/Echo-v0", model=model, out=tmp_path / "run", steps=1, backend="megatron", sft_warmup=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="--sft-warmup trains with the torch backend's own optimizer"):
        check_settings(settings)
    assert not (tmp_path / "run").exists()
