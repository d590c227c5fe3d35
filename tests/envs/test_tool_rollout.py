"""The tool envs under the real loop: scripted engine, Qwen3 tokenizer, hermes parser."""

import asyncio
import json

import pytest

from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.chat import ChatRenderer
from miles_envs.envs.search_env import SearchEnv
from miles_envs.envs.tool_calc import ToolCalcEnv
from miles_envs.envs.tool_env import PARSE_ERROR_MESSAGE
from miles_envs.loop import LoopConfig, run_episode
from miles_envs.metrics import RolloutMetrics
from miles_envs.parsers import get_parser
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def hermes(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def play(env, tokenizer, replies, seed):
    engine = ScriptedEngine(tokenizer, replies)
    return asyncio.run(run_episode(env, engine, ChatRenderer(tokenizer), get_parser("hermes"), LoopConfig(), seed=seed))


def tool_contents(trajectory):
    return [(m["name"], m["content"]) for m in trajectory.messages if m["role"] == "tool"]


def test_tool_calc_with_correct_malformed_and_unknown_calls(qwen3):
    replies = [
        hermes("calculator", {"expression": "700 * 212 * 64 / 100"}),
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>',
        hermes("abacus", {"beads": 3}),
        "The answer is <answer>94976</answer>.",
    ]
    t = play(ToolCalcEnv(), qwen3, replies, seed=0)
    t.validate()
    assert t.status is Status.COMPLETED and t.num_turns == 4
    assert tool_contents(t) == [
        ("calculator", "94976"),
        ("abacus", "Error: unknown tool 'abacus'. Available tools: calculator."),
    ]
    [parse_notice] = [m for m in t.messages[2:] if m["role"] == "user"]
    assert parse_notice["content"].startswith(PARSE_ERROR_MESSAGE.split("{error}")[0])
    assert (t.reward, t.reward_components) == (1.0, {"correct": 1.0, "format": 1.0})
    assert (t.metadata["tool_calls"], t.metadata["parse_errors"]) == (2, 1)


def test_search_episode_reward_components_reach_trajectory_and_metrics(qwen3):
    replies = [hermes("search", {"query": "leazul lamp inventor"}), "<answer>Beatres Tavocun</answer>"]
    solved = play(SearchEnv(), qwen3, replies, seed=1)
    partial = play(SearchEnv(), qwen3, [replies[0], "<answer>Tavocun</answer>"], seed=1)
    assert tool_contents(solved)[0][1].startswith("Doc 1(Title: Leazul lamp) The leazul lamp is a device")
    assert solved.reward_components == {"exact_match": 1.0, "f1": 1.0, "format": 1.0}
    assert partial.reward_components == {"exact_match": 0.0, "f1": pytest.approx(2 / 3), "format": 1.0}
    metrics = RolloutMetrics()
    metrics.add(solved)
    metrics.add(partial)
    summary = metrics.summary()
    assert summary["reward_mean"] == 0.5
    assert summary["reward_components_mean"] == {"exact_match": 0.5, "f1": pytest.approx(5 / 6), "format": 1.0}


def test_terminate_policy_ends_the_episode_with_the_penalty(qwen3):
    t = play(ToolCalcEnv(on_parse_error="terminate"), qwen3, ['<tool_call>\n{"name": \n</tool_call>'], seed=0)
    assert t.status is Status.COMPLETED and t.num_turns == 1
    assert (t.reward, t.reward_components) == (-1.0, {"parse_error": -1.0})
