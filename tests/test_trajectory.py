import json

import numpy as np
import pytest

from miles_envs.trajectory import Status, Trajectory, TrajectoryError, Turn, expert_dtype
from miles_envs.trajectory_io import JsonlWriter, read_trajectories, repair_jsonl, write_parquet


def make_trajectory(**overrides):
    prompt, response = [1, 2, 3], [10, 11, 12, 20, 21, 30]
    routed = (np.arange((len(prompt) + len(response) - 1) * 2 * 2) % 200).reshape(-1, 2, 2).astype(np.uint8)
    fields = dict(
        prompt_ids=prompt,
        response_ids=response,
        loss_mask=[1, 1, 1, 0, 0, 1],
        logprobs=[-0.1, -1 / 3, -2.5e-7, 0.0, 0.0, -0.7000000000000001],
        routed_experts=routed,
        turns=[
            Turn("model", 0, 3, "stop", "v1", 3, 2, 4),
            Turn("env", 3, 5),
            Turn("model", 5, 6, "length", "v2"),
        ],
        messages=[{"role": "user", "content": "hé ✓"}, {"role": "assistant", "content": "x"}],
        reward=0.75,
        reward_components={"em": 1.0, "f1": 0.5},
        status=Status.TRUNCATED,
        env_id="miles/Echo-v0",
        group_id="g",
        agent_id="a",
        episode_id="0:1",
        seed=7,
        flags=["non_append_only_template"],
        metadata={"tool_calls": 2},
    )
    fields.update(overrides)
    return Trajectory(**fields)


def assert_same(a, b):
    da, db = a.to_dict(), b.to_dict()
    assert da == db
    assert a.routed_experts.dtype == b.routed_experts.dtype
    np.testing.assert_array_equal(a.routed_experts, b.routed_experts)


def test_validate_accepts_a_consistent_trajectory():
    make_trajectory().validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_mask": [1, 1, 1, 0, 0]}, "must match response_ids"),
        ({"logprobs": [-0.1, -0.2, -0.3, -0.5, 0.0, -0.7]}, "env token"),
        ({"loss_mask": [1, 1, 2, 0, 0, 1]}, "must be 0 or 1"),
        ({"routed_experts": np.zeros((3, 2, 2), np.uint8)}, r"expected \[8, layers, topk\]"),
        ({"turns": [Turn("model", 0, 3), Turn("env", 4, 6)]}, "must tile"),
        ({"status": Status.FAILED, "error": None}, "must carry its error"),
    ],
)
def test_validate_rejects(overrides, message):
    with pytest.raises(TrajectoryError, match=message):
        make_trajectory(**overrides).validate()


def test_jsonl_round_trip_is_lossless(tmp_path):
    t = make_trajectory()
    path = tmp_path / "t.jsonl"
    with JsonlWriter(path) as writer:
        writer.write(t)
        writer.write(make_trajectory(routed_experts=None, status=Status.FAILED, error="boom\ntrace"))
    back = read_trajectories(path)
    assert_same(t, back[0])
    assert back[1].routed_experts is None and back[1].error == "boom\ntrace"


def test_parquet_round_trip_is_lossless(tmp_path):
    big = (np.arange(8 * 3 * 2) % 300).reshape(8, 3, 2).astype(np.uint16)
    ts = [make_trajectory(), make_trajectory(routed_experts=big, id="other"), make_trajectory(routed_experts=None)]
    path = tmp_path / "t.parquet"
    assert write_parquet(ts, path) == 3
    back = read_trajectories(path)
    assert_same(ts[0], back[0])
    assert_same(ts[1], back[1])
    assert back[2].routed_experts is None and back[2].to_dict() == ts[2].to_dict()


def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "t.jsonl"
    line = (make_trajectory().to_json() + "\n").encode()
    path.write_bytes(line + line[: len(line) // 2])
    assert repair_jsonl(path) == len(line) // 2
    assert len(read_trajectories(path)) == 1


def test_miles_sample_fields():
    t = make_trajectory()
    sample = t.to_sample()
    assert sample["tokens"] == [1, 2, 3, 10, 11, 12, 20, 21, 30]
    assert sample["response_length"] == 6
    assert sample["loss_mask"] == [1, 1, 1, 0, 0, 1]
    assert sample["rollout_log_probs"][3:5] == [0.0, 0.0]
    assert sample["rollout_routed_experts"].dtype == np.int32
    assert sample["rollout_routed_experts"].shape == (8, 2, 2)
    assert sample["status"] == "TRUNCATED" and sample["reward"] == 0.75
    assert sample["metadata"]["reward_components"] == {"em": 1.0, "f1": 0.5}
    json.dumps(sample["metadata"])


def test_expert_dtype_is_the_smallest_that_fits():
    assert expert_dtype(256) == np.uint8
    assert expert_dtype(257) == np.uint16
    assert expert_dtype(70000) == np.uint32


def test_version_spans_must_tile_their_model_turn():
    def with_spans(spans):
        return Trajectory(prompt_ids=[1], response_ids=[5, 6, 7, 8], loss_mask=[1, 1, 1, 0], logprobs=[-1.0, -1.0, -1.0, 0.0],
                          turns=[Turn("model", 0, 3, weight_version="step-2", version_spans=spans), Turn("env", 3, 4)])

    good = with_spans([(0, "step-1"), (2, "step-2")]).validate()
    assert good.model_version_spans() == [(0, 2, "step-1"), (2, 3, "step-2")] and good.version_range == (1, 2)
    for bad in ([(1, "step-1")], [(0, "step-1"), (0, "step-2")], [(0, "step-1"), (3, "step-2")]):
        with pytest.raises(TrajectoryError, match="version spans"):
            with_spans(bad).validate()
