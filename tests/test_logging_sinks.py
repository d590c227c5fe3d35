import glob
import json
import struct

import pytest

from miles_envs.logging_sinks import (
    FanOutSink,
    JsonSink,
    MetricsSink,
    TensorBoardSink,
    flatten_scalars,
    open_sink,
    open_sinks,
)
from miles_envs.metrics import RolloutMetrics
from miles_envs.trajectory import Status, Trajectory, Turn


def rollout_summary() -> dict:
    metrics = RolloutMetrics()
    for reward, status in ((1.0, Status.COMPLETED), (0.0, Status.TRUNCATED)):
        metrics.add(Trajectory(
            prompt_ids=[1, 2], response_ids=[3, 4], loss_mask=[1, 0], logprobs=[-0.5, 0.0],
            turns=[Turn(start=0, end=1, kind="model"), Turn(start=1, end=2, kind="env")],
            reward=reward, reward_components={"format": reward / 2}, status=status,
        ))
    return metrics.summary()


TRAIN_METRICS = {"loss": 0.25, "mtp/loss": 1.5, "rollout/spec_accept_rate": 0.75, "grad_norm": float("nan")}


def test_flatten_nests_with_slashes_and_drops_non_scalars():
    flat = flatten_scalars({"a": 1, "ok": True, "name": "x", "ids": [1, 2], "none": None, "status": {"completed": 3}})
    assert flat == {"a": 1.0, "ok": 1.0, "status/completed": 3.0}


def test_flatten_rollout_summary_keeps_status_and_reward_components():
    flat = flatten_scalars(rollout_summary())
    assert flat["episodes"] == 2.0
    assert flat["status/completed"] == 1.0 and flat["status/truncated"] == 1.0
    assert flat["reward_components_mean/format"] == 0.25
    assert flat["truncated_rate"] == 0.5


def test_json_sink_appends_one_line_per_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = JsonSink(path)
    sink.log(rollout_summary(), step=0)
    sink.log({"loss": 0.25, "mtp/loss": 1.5}, step=1)
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert lines[0]["status"] == {"completed": 1, "truncated": 1}
    assert lines[1] == {"step": 1, "loss": 0.25, "mtp/loss": 1.5}


def test_tensorboard_sink_writes_scalars_readable_by_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    sink = open_sink(f"tensorboard:{tmp_path / 'tb'}")
    assert isinstance(sink, TensorBoardSink) and isinstance(sink, MetricsSink)
    sink.log(rollout_summary(), step=0)
    sink.log(TRAIN_METRICS, step=1)
    sink.log({**TRAIN_METRICS, "loss": 0.125}, step=2)
    sink.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"status/completed", "reward_components_mean/format", "loss", "mtp/loss"} <= tags
    assert "grad_norm" not in tags  # non-finite values are not plotted
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.25), (2, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("status/truncated")] == [(0, 1.0)]


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB log blocks of ``Record`` protos after a
    7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    rows, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_sink_offline_run_records_flattened_history(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sink = open_sink("wandb:miles-envs-test")
    sink.log(rollout_summary(), step=0)
    sink.log({"loss": 0.25, "mtp/loss": 1.5}, step=1)
    sink.close()
    wandb.teardown()  # the wandb-core service writes the run file until it shuts down
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = _wandb_history(run_file)
    assert [row["_step"] for row in rows] == [0, 1]
    assert rows[0]["status/completed"] == 1 and rows[0]["reward_components_mean/format"] == 0.25
    assert rows[1]["loss"] == 0.25 and rows[1]["mtp/loss"] == 1.5


def test_fan_out_reaches_every_sink(tmp_path):
    sink = open_sinks([f"json:{tmp_path / 'a.jsonl'}", f"json:{tmp_path / 'b.jsonl'}"])
    assert isinstance(sink, FanOutSink) and len(sink.sinks) == 2
    sink.log({"loss": 1.0}, step=3)
    sink.close()
    for name in ("a.jsonl", "b.jsonl"):
        assert json.loads((tmp_path / name).read_text()) == {"step": 3, "loss": 1.0}


@pytest.mark.parametrize("spec", ["tensorboard", "csv:out.csv", "json:", "runs/tb"])
def test_bad_sink_spec_names_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="KIND:TARGET with KIND one of json, tensorboard, wandb"):
        open_sink(spec)
