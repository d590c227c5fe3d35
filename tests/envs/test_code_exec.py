"""miles/CodeExec-v0 against a real local (bubblewrap) sandbox."""

from __future__ import annotations

import json

import pytest

from miles_envs.checker import check_env
from miles_envs.envs.code_exec import PYTHON_TOOL, CodeExecEnv, extract_solution, load_problems, run_python
from miles_envs.sandbox import ExecResult, SandboxPool, make_sandbox

REFERENCE = {
    "is_palindrome": "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]",
    "fizzbuzz": "def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0"
    " else str(i) for i in range(1, n + 1)]",
    "two_sum": "def two_sum(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n        if target - x in seen:\n"
    "            return [seen[target - x], j]\n        seen[x] = j",
    "reverse_words": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
    "fibonacci": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "flatten": "def flatten(items):\n    out = []\n    for x in items:\n        out.extend(flatten(x) if isinstance(x, list) else [x])\n"
    "    return out",
    "run_length_encode": "import itertools\ndef run_length_encode(s):\n"
    "    return ''.join(f'{len(list(g))}{k}' for k, g in itertools.groupby(s))",
    "max_subarray": "def max_subarray(nums):\n    best = cur = nums[0]\n    for x in nums[1:]:\n        cur = max(x, cur + x)\n"
    "        best = max(best, cur)\n    return best",
    "is_prime": "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
    "            return False\n        i += 1\n    return True",
    "roman_to_int": "def roman_to_int(s):\n    v = dict(I=1, V=5, X=10, L=50, C=100, D=500, M=1000)\n"
    "    return sum(-v[a] if v[a] < v[b] else v[a] for a, b in zip(s, s[1:] + 'I')) if s else 0",
    "merge_intervals": "def merge_intervals(intervals):\n    out = []\n    for a, b in sorted(intervals):\n"
    "        if out and a <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], b)\n        else:\n"
    "            out.append([a, b])\n    return out",
    "count_vowels": "def count_vowels(s):\n    out = {}\n    for c in s.lower():\n        if c in 'aeiou':\n"
    "            out[c] = out.get(c, 0) + 1\n    return out",
}


def answer(code: str) -> dict:
    return {"role": "assistant", "content": f"Here it is:\n```python\n{code}\n```"}


def python_call(code, call_id="c1", name="python"):
    arguments = json.dumps({"code": code})
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture
async def pool():
    pool = SandboxPool("local", size=2, timeout=10)
    yield pool
    await pool.close()


@pytest.fixture
def env(pool):
    return CodeExecEnv(pool, per_test_s=0.5)


async def test_every_reference_solution_scores_one(env):
    assert {p.id for p in load_problems()} == set(REFERENCE)
    for problem in env.problems:
        await env.areset(options={"problem_id": problem.id})
        _, reward, terminated, _, info = await env.astep(answer(REFERENCE[problem.id]))
        assert (reward, terminated, info["tests_passed"]) == (1.0, True, len(problem.tests)), problem.id


async def test_partially_correct_solution_gets_the_fraction(env):
    obs, info = await env.areset(options={"problem_id": "fibonacci"})
    assert info == {"tools": [PYTHON_TOOL], "problem_id": "fibonacci"}
    assert "fibonacci" in obs[1]["content"]
    # Right for n <= 1 only: 2 of the 5 tests.
    _, reward, _, _, info = await env.astep(answer("def fibonacci(n):\n    return n if n < 2 else -1"))
    assert reward == pytest.approx(2 / 5)
    assert info["reward_components"] == {"tests_passed": pytest.approx(0.4), "format": 1.0}


async def test_wrong_types_and_exceptions_fail_their_tests(env):
    await env.areset(options={"problem_id": "fibonacci"})
    _, as_float, _, _, _ = await env.astep(answer("def fibonacci(n):\n    return float(n) if n < 2 else 1 / 0"))
    assert as_float == 0.0


async def test_hanging_test_is_cut_by_the_per_test_alarm(env):
    await env.areset(options={"problem_id": "is_prime"})
    code = "def is_prime(n):\n    if n == 97:\n        while True: pass\n    return n == 2"
    _, reward, _, _, info = await env.astep(answer(code))
    assert info["tests_passed"] == 4  # 2, 1, -7, 1000000000000: right; 97 hangs; two primes wrong


async def test_forged_result_lines_do_not_score(env):
    await env.areset(options={"problem_id": "reverse_words"})
    code = (
        "import sys\nprint('@@results-' + 'f' * 32 + '@@[{\"value\": \"blue is sky the\"}]')\n"
        "def reverse_words(s):\n    return ''"
    )
    _, reward, _, _, _ = await env.astep(answer(code))
    assert reward == 0.0


async def test_python_tool_runs_code_and_shows_output(env):
    await env.areset(options={"problem_id": "fizzbuzz"})
    obs, reward, terminated, _, _ = await env.astep(
        {"role": "assistant", "content": None, "tool_calls": [python_call("print(6 * 7)\nimport sys; sys.exit(2)")]}
    )
    assert (reward, terminated) == (0.0, False)
    assert obs == [{"role": "tool", "tool_call_id": "c1", "name": "python", "content": "42\n[exit code 2]"}]


async def test_bad_tool_calls_become_error_messages(env):
    await env.areset(options={"problem_id": "fizzbuzz"})
    bad_json = {"id": "c2", "type": "function", "function": {"name": "python", "arguments": "{not json"}}
    obs, *_ = await env.astep({"role": "assistant", "content": None,
                               "tool_calls": [python_call("1", name="shell"), bad_json]})  # fmt: skip
    assert obs[0]["content"] == "Error: unknown tool 'shell'. The only tool is 'python'."
    assert obs[1]["content"].startswith("Error: arguments must be JSON")


async def test_runs_are_bounded(pool):
    env = CodeExecEnv(pool, max_runs=1)
    await env.areset(seed=0)
    first, *_ = await env.astep({"role": "assistant", "tool_calls": [python_call("print('a')")]})
    second, *_ = await env.astep({"role": "assistant", "tool_calls": [python_call("print('b')")]})
    assert first[0]["content"] == "a"
    assert second[0]["content"] == "Error: no runs left (1 used). Reply with your solution."


async def test_reply_without_code_block_ends_with_zero(env):
    await env.areset(seed=1)
    obs, reward, terminated, _, info = await env.astep({"role": "assistant", "content": "I give up"})
    assert (obs, reward, terminated) == ([], 0.0, True)
    assert info["reward_components"] == {"tests_passed": 0.0, "format": 0.0}


async def test_unknown_problem_id_lists_the_known_ones(env):
    with pytest.raises(ValueError, match="known: is_palindrome"):
        await env.areset(options={"problem_id": "nope"})


def test_extract_solution_takes_the_last_python_block():
    content = "```python\nfirst\n```\ntext\n```py\nsecond\n```\n```\nplain\n```"
    assert extract_solution(content) == "second\n"
    assert extract_solution("no code") is None


async def test_run_python_reports_what_happened(pool):
    assert await run_python("print('hi')", pool) == "hi"
    assert await run_python("pass", pool) == "(no output)"
    assert await run_python("import sys; print('o'); print('e', file=sys.stderr)", pool) == "o\n[stderr]\ne"
    sandbox = make_sandbox("local", timeout=0.5)
    try:
        assert await run_python("while True: pass", sandbox) == "[timed out: the run was killed]"
    finally:
        await sandbox.close()


def test_env_passes_the_checker_with_its_own_sandbox():
    env = CodeExecEnv("local", timeout=5)
    try:
        check_env(env)
        env.reset(options={"problem_id": "two_sum"})
        _, reward, *_ = env.step(answer(REFERENCE["two_sum"]))
        assert reward == 1.0
    finally:
        env.close()
    assert env._sandbox is None


def test_format_marks_truncation_and_oom():
    from miles_envs.envs.code_exec import format_exec_result

    assert format_exec_result(ExecResult("x", "", 0, output_truncated=True)) == "x\n[output truncated]"
    assert format_exec_result(ExecResult("", "MemoryError\n", 137, oom_killed=True)) == (
        "MemoryError\n[memory limit reached: the run was killed]"
    )
