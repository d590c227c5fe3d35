"""ToolEnv base: episode flow, parse-error policies, truncation, reward combination."""

import json

import pytest

from miles_envs.checker import check_env
from miles_envs.envs.tool_env import PARSE_ERROR_MESSAGE, Task, ToolEnv, extract_tagged
from miles_envs.tools import tool


@tool
def reverse(text: str) -> str:
    """Reverse a string."""
    return text[::-1]


TASKS = [Task("t0", "Reverse 'abc'.", "cba"), Task("t1", "Reverse 'xyz'.", "zyx")]


def grade(task, message):
    answer = extract_tagged(message["content"])
    return {"correct": float(answer == task.answer), "format": float(answer is not None)}


def make_env(**kwargs):
    return ToolEnv([reverse], tasks=TASKS, reward_fn=grade, **kwargs)


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def act(content=None, tool_calls=(), parse_error=None):
    action = {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}
    if parse_error:
        action["parse_error"] = parse_error
    return action


async def test_episode_runs_tools_then_scores_the_answer():
    env = make_env()
    obs, info = await env.areset(options={"task_index": 0})
    assert obs == [{"role": "system", "content": ToolEnv.system_prompt}, {"role": "user", "content": "Reverse 'abc'."}]
    assert info == {"tools": [reverse.spec], "task_id": "t0"}
    assert await env.astep(act(tool_calls=[call("c1", "reverse", {"text": "abc"}), call("c2", "nope", {})])) == (
        [
            {"role": "tool", "tool_call_id": "c1", "name": "reverse", "content": "cba"},
            {"role": "tool", "tool_call_id": "c2", "name": "nope", "content": "Error: unknown tool 'nope'. Available tools: reverse."},
        ],
        0.0, False, False, {},
    )
    assert await env.astep(act("<answer>cba</answer>")) == (
        [], 2.0, True, False, {"reward_components": {"correct": 1.0, "format": 1.0}}
    )
    with pytest.raises(RuntimeError, match="call reset\\(\\) first"):
        await env.astep(act("again"))


async def test_reward_weights_combine_components():
    env = make_env(reward_weights={"correct": 0.9, "format": 0.1})
    await env.areset(options={"task_index": 1})
    _, reward, *_ = await env.astep(act("<answer>wrong</answer>"))
    assert reward == pytest.approx(0.1)


async def test_parse_error_observed_by_default():
    env = make_env()
    await env.areset(options={"task_index": 0})
    obs, reward, terminated, truncated, info = await env.astep(act("<tool_call>{oops", parse_error="invalid JSON at 1:2"))
    assert obs == [{"role": "user", "content": PARSE_ERROR_MESSAGE.format(error="invalid JSON at 1:2")}]
    assert (reward, terminated, truncated, info) == (0.0, False, False, {})


async def test_parse_error_can_terminate_with_a_penalty():
    env = make_env(on_parse_error="terminate", parse_error_penalty=-0.5)
    await env.areset(options={"task_index": 0})
    assert await env.astep(act("<tool_call>{oops", parse_error="invalid JSON")) == (
        [], -0.5, True, False, {"parse_error": "invalid JSON", "reward_components": {"parse_error": -0.5}}
    )


async def test_truncated_after_max_turns_without_an_answer():
    env = make_env(max_turns=2)
    await env.areset(options={"task_index": 0})
    first = await env.astep(act(tool_calls=[call("a", "reverse", {"text": "q"})]))
    second = await env.astep(act(tool_calls=[call("b", "reverse", {"text": "r"})]))
    assert first[1:] == (0.0, False, False, {})
    assert second == ([{"role": "tool", "tool_call_id": "b", "name": "reverse", "content": "r"}], 0.0, False, True, {})


def test_seeded_resets_are_reproducible_and_unseeded_ones_continue_the_stream():
    env = make_env()
    draws = [env.reset(seed=3)[1]["task_id"] for _ in range(3)]
    assert len(set(draws)) == 1
    env.reset(seed=3)
    continued = [env.reset()[1]["task_id"] for _ in range(8)]
    assert set(continued) == {"t0", "t1"}


def test_base_class_passes_the_conformance_check():
    check_env(make_env(), policy=lambda history: act("<answer>cba</answer>"))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="'observe' or 'terminate'"):
        make_env(on_parse_error="ignore")
    with pytest.raises(NotImplementedError, match="pass tasks= or override make_task"):
        ToolEnv([reverse]).reset(seed=0)
