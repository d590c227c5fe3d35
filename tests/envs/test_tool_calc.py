import json

import pytest

from miles_envs.checker import check_env
from miles_envs.envs.tool_calc import TEMPLATES, ToolCalcEnv, calculator, parse_number
from miles_envs.envs.tool_env import PARSE_ERROR_MESSAGE


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def act(content=None, tool_calls=(), parse_error=None):
    action = {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}
    if parse_error:
        action["parse_error"] = parse_error
    return action


PROMPT_SEED_0 = "A stadium has 700 rows of 212 seats. At a match 64% of the seats are taken. How many seats are taken?"


def test_scripted_episode_with_correct_malformed_and_unknown_calls():
    env = ToolCalcEnv()
    obs, info = env.reset(seed=0)
    assert obs[1] == {"role": "user", "content": PROMPT_SEED_0}
    assert info == {"tools": [calculator.spec], "task_id": "stadium-700-212-64"}

    assert env.step(act(tool_calls=[call("1", "calculator", {"expression": "700 * 212"}),
                                    call("2", "calculator", {"expression": "148400 * 64 / 100"})])) == (
        [
            {"role": "tool", "tool_call_id": "1", "name": "calculator", "content": "148400"},
            {"role": "tool", "tool_call_id": "2", "name": "calculator", "content": "94976"},
        ],
        0.0, False, False, {},
    )
    assert env.step(act("<tool_call>{calculator", parse_error="unterminated JSON object")) == (
        [{"role": "user", "content": PARSE_ERROR_MESSAGE.format(error="unterminated JSON object")}], 0.0, False, False, {}
    )
    assert env.step(act(tool_calls=[call("3", "python", {"code": "1+1"}), call("4", "calculator", {"expr": "1"})])) == (
        [
            {"role": "tool", "tool_call_id": "3", "name": "python",
             "content": "Error: unknown tool 'python'. Available tools: calculator."},
            {"role": "tool", "tool_call_id": "4", "name": "calculator",
             "content": "Error: invalid arguments for calculator: missing required argument 'expression'; unexpected argument 'expr'"},
        ],
        0.0, False, False, {},
    )
    assert env.step(act("The stadium holds <answer>94,976</answer> people.")) == (
        [], 1.0, True, False, {"reward_components": {"correct": 1.0, "format": 1.0}}
    )


@pytest.mark.parametrize(
    ("content", "components"),
    [
        ("<answer>94976</answer>", {"correct": 1.0, "format": 1.0}),
        ("<answer>94977</answer>", {"correct": 0.0, "format": 1.0}),
        ("94976", {"correct": 0.0, "format": 0.0}),
    ],
)
def test_reward_needs_the_exact_number_in_answer_tags(content, components):
    env = ToolCalcEnv()
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(act(content))
    assert (reward, terminated, info["reward_components"]) == (components["correct"], True, components)


def test_calculator_errors_reach_the_model():
    env = ToolCalcEnv()
    env.reset(seed=0)
    obs, *_ = env.step(act(tool_calls=[call("a", "calculator", {"expression": "1/0"}),
                                       call("b", "calculator", {"expression": "__import__('os')"})]))
    assert obs[0]["content"] == "Error: calculator raised ZeroDivisionError: division by zero"
    assert obs[1]["content"].startswith("Error: calculator raised ")


def test_every_template_is_drawn_and_every_answer_is_a_positive_integer():
    env = ToolCalcEnv()
    seen = set()
    for seed in range(200):
        env.reset(seed=seed)
        seen.add(env.task.metadata["template"])
        assert isinstance(env.task.answer, int) and env.task.answer > 0, env.task
    assert seen == {template.name for template in TEMPLATES}


def test_parse_number():
    assert [parse_number(text) for text in ("12,345", "$1200.50 total", "-7", "3, 4", "none", None)] == [
        12345, pytest.approx(1200.5), -7, 3, None, None
    ]


def test_conformance_with_a_solving_policy():
    def solver(history):
        user_prompt = history[1]["content"]
        tool_results = [m for m in history if m["role"] == "tool"]
        if not tool_results:
            return act(tool_calls=[call("c", "calculator", {"expression": "1 + 1"})])
        return act(f"<answer>{len(user_prompt)}</answer>")

    check_env(ToolCalcEnv(), policy=solver)
