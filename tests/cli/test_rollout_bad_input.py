"""`miles-envs rollout` on bad input and awkward reruns: clear errors, no traceback, nothing half-written."""

import json
from collections import Counter

import pytest

from miles_envs.agents.protocol_server import Fault, ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status
from miles_envs.trajectory_io import read_trajectories
from tests.conftest import run_cli

ECHO = "miles/Echo-v0"

BAD_INPUT = [
    (["-n", "0"], "-n 0: must be at least 1"),
    (["-n", "-3"], "-n -3: must be at least 1"),
    (["-g", "0"], "--group-size 0: must be at least 1"),
    (["--retries", "0"], "--retries 0: must be at least 1"),
    (["--retries", "-2"], "--retries -2: must be at least 1"),
    (["--max-running", "0"], "--max-running 0: must be at least 1"),
    (["--drain-timeout", "0"], "--drain-timeout 0: must be positive"),
    (["--update-policy", "abort"], "unknown update policy 'abort': choose from continue, abort_and_resume, drain"),
    (["--routed-experts"], "--routed-experts needs a mixture-of-experts model"),
    (["--env-id", "miles/TicTacToe-v0"], "miles/TicTacToe-v0 is a multi-agent env"),
    (["--concurrency", "0"], "--concurrency 0: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--max-turns", "0"], "--max-turns 0: must be at least 1"),
    (["--temperature", "-1"], "--temperature -1: must be 0 (greedy) or more"),
    (["--log", "json:/proc/m.json"], "--log json:/proc/m.json"),
    (["--log", "nosuch:x"], "--log nosuch:x"),
]


def rollout(out, *extra, env=ECHO):
    return run_cli("rollout", env, "-o", str(out), "--tokenizer", "qwen2_5", *extra, check=False)


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_fails_fast_with_a_clear_message_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out.jsonl"
    if args[0] == "--env-id":
        result = rollout(out, env=args[1])
    else:
        result = rollout(out, *args)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["/proc/out.jsonl", "{tmp}/afile/out.jsonl"])
def test_an_unwritable_output_fails_before_any_work(tmp_path, where):
    (tmp_path / "afile").write_text("")
    result = rollout(where.format(tmp=tmp_path))
    assert result.returncode != 0 and "-o" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("name, content", [("out.jsonl", '{"a": 1}\n'), ("out.parquet", '{"a": 1}\n')])
def test_an_output_that_is_not_a_trajectory_file_is_refused_and_left_alone(tmp_path, name, content):
    out = tmp_path / name
    out.write_text(content)
    result = rollout(out, "-n", "2")
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert f"cannot resume into -o {out}" in " ".join(result.stderr.split())
    assert [p.name for p in tmp_path.iterdir()] == [name] and out.read_text() == content


def test_a_finished_run_says_already_complete_and_keeps_its_metrics(tmp_path):
    out = tmp_path / "out.jsonl"
    assert rollout(out, "-n", "3").returncode == 0
    metrics = (tmp_path / "out.jsonl.metrics.json").read_bytes()
    data = out.read_bytes()
    again = rollout(out, "-n", "3")
    assert again.returncode == 0 and "already complete: 3 episodes" in " ".join(again.stderr.split())
    assert (tmp_path / "out.jsonl.metrics.json").read_bytes() == metrics and out.read_bytes() == data


def test_extending_a_run_merges_its_metrics(tmp_path):
    out = tmp_path / "out.parquet"
    assert rollout(out, "-n", "2", "-g", "2").returncode == 0
    assert rollout(out, "-n", "3", "-g", "2").returncode == 0
    metrics = json.loads((tmp_path / "out.parquet.metrics.json").read_text())
    assert (metrics["episodes"], metrics["new_episodes"], metrics["resumed_episodes"]) == (6, 2, 4)
    assert metrics["status"] == {"completed": 6} and metrics["groups"] == 3
    assert sorted(t.episode_id for t in read_trajectories(out)) == [f"{i}:{j}" for i in range(3) for j in range(2)]


def test_all_aborted_exits_nonzero_and_a_rerun_replays_each_aborted_episode_once(tmp_path):
    n, group = 3, 2
    calls = []

    def reply(context):
        calls.append(context.input_ids)
        return "red blue"

    server = ProtocolServer(ScriptedEngine(load_tokenizer("qwen2_5"), reply), context_length=4096)
    out = tmp_path / "out.jsonl"
    with server.running_in_thread():
        engine = f"sglang://127.0.0.1:{server.port}"
        # every attempt (first try and one retry per episode) is refused as a bad request: no client-side retry
        server.inject(Fault.server_error(400), times=n * group * 2)
        first = rollout(out, "--engine", engine, "-n", str(n), "-g", str(group), "--retries", "1")
        assert first.returncode != 0 and "Traceback" not in first.stderr
        assert f"every episode was aborted ({n * group})" in " ".join(first.stderr.split())
        assert "injected server error 400" in first.stderr
        assert server.pending_faults == 0 and calls == []
        assert {t.status for t in read_trajectories(out)} == {Status.ABORTED}

        second = rollout(out, "--engine", engine, "-n", str(n), "-g", str(group), "--retries", "1")
        assert second.returncode == 0, second.stderr
    assert len(calls) == n * group  # each aborted episode played again exactly once
    episodes = read_trajectories(out)
    assert Counter(t.episode_id for t in episodes) == Counter(f"{i}:{j}" for i in range(n) for j in range(group))
    assert {t.status for t in episodes} == {Status.COMPLETED}
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert (metrics["episodes"], metrics["retried_from_disk"], metrics["status"]) == (n * group, n * group, {"completed": n * group})
