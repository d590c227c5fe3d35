"""The tool-use warm start's stopping rule, on a real tiny model, trainer and embedded engine (CPU)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "gpu"))

import toolrl  # noqa: E402

pytest.importorskip("miles_envs.agents.embedded")


def options(**changes) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    toolrl.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in {"sft_batch": 2, "sft_val_tasks": 1, "tool_max_new_tokens": 4, **changes}.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("target, steps, checked_at", [
    (0.0, 6, [2]),  # any validation reward reaches 0: the first check stops the warm start
    (1.5, 5, [2, 4, 5]),  # never reached: a check every 2 steps and one at the last step
])
async def test_warm_start_stops_at_the_validation_target_or_the_last_step(tmp_path, target, steps, checked_at):
    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.chat.renderer import ChatRenderer
    from miles_envs.models.factory import init_model
    from miles_envs.pipeline.demonstrations import collect_demonstrations
    from miles_envs.trainer import Trainer, TrainerConfig

    folder = init_model(tmp_path / "model", size="tiny")
    trainer = Trainer.from_pretrained(str(folder), TrainerConfig(device="cpu", max_row_tokens=1024))
    engine = EmbeddedEngine.from_path(folder, device="cpu")
    renderer = ChatRenderer(engine.tokenizer)
    demos = await collect_demonstrations(toolrl.DEMONSTRATED["miles/ToolCalc-v0"], renderer, [0, 1, 2], max_context=4096)
    logged = []
    try:
        curve = await toolrl.supervised_warm_start(trainer, engine, renderer, demos,
                                                   options(sft_target=target, sft_steps=steps, sft_check_every=2), 0, logged.append)
    finally:
        await engine.close()
    assert [c["step"] for c in curve] == checked_at and len(logged) == len(checked_at)
    assert all(0.0 <= c["val_reward"] <= 1.0 and c["val_turns_per_episode"] >= 1 and c["sft/loss"] > 0 for c in curve)
    # the engine serves the weights of the last check
    assert engine.weight_version == f"sft-{checked_at[-1]}"


def test_every_seed_starts_grpo_from_the_shared_warm_start(tmp_path):
    """The whole script on CPU: one warm start, two seeds' GRPO from its checkpoint, the results file."""
    import json
    import subprocess

    from miles_envs.models.factory import init_model

    folder = init_model(tmp_path / "model", size="tiny", mtp=1)
    out, partial = tmp_path / "toolrl.json", tmp_path / "partial"
    command = [sys.executable, str(Path(toolrl.__file__)), "--model", str(folder), "--device", "cpu", "--no-parallel",
               "--tool-seeds", "2", "--tool-steps", "1", "--tool-tasks", "1", "--tool-group", "2", "--demos", "2",
               "--sft-steps", "2", "--sft-batch", "2", "--sft-check-every", "1", "--sft-target", "1.5", "--sft-val-tasks", "1",
               "--eval-tasks", "1", "--tool-max-new-tokens", "8", "--out", str(out), "--partial-dir", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    shared = report["warm_start"]
    assert [c["step"] for c in shared["sft"]] == [1, 2] and shared["demonstrations"] == 4
    assert [r["seed"] for r in report["runs"]] == [0, 1] and report["summary"]["seeds_done"] == 2
    for run in report["runs"]:
        # each seed reports the shared start (not a warm start of its own) and its own RL step
        assert run["sft"] == shared["sft"] and run["eval"]["after_sft"] == shared["eval"]["after_sft"]
        assert [s["step"] for s in run["steps"]] == [0] and "after_rl" in run["eval"]
    assert report["settings"]["shared_warm_start"] is True and report["turn_caps"] == dict(toolrl.TURN_CAPS)
    assert {p.name for p in partial.iterdir()} == {"toolrl_warm_start.json", "toolrl_seed0.json", "toolrl_seed1.json"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
