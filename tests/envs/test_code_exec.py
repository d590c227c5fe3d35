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


# -- the repository task family ----------------------------------------------------------------------
FIXED_SOURCES = {
    "inventory": ("inventory/store.py",
                  "class Store:\n    def __init__(self):\n        self.stock = {}\n        self.prices = {}\n\n"
                  "    def add(self, name, count, price):\n        self.stock[name] = self.stock.get(name, 0) + count\n"
                  "        self.prices[name] = price\n\n    def remove(self, name, count):\n"
                  "        if count > self.stock.get(name, 0):\n            raise ValueError(f'only {self.stock.get(name, 0)} {name}')\n"
                  "        self.stock[name] -= count\n\n    def total_value(self):\n"
                  "        return sum(self.stock[n] * self.prices[n] for n in self.stock)\n"),
    "slugify": ("textkit/slug.py",
                "{separator_line}\nimport re\n\n\ndef slugify(title):\n"
                "    return SEPARATOR.join(re.findall('[a-z0-9]+', title.lower()))\n"),
    "intervals": ("schedule/merge.py",
                  "def merge(intervals):\n    out = []\n    for start, end in sorted(intervals):\n"
                  "        if out and start <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], end)\n"
                  "        else:\n            out.append([start, end])\n    return out\n"),
}


def tool_call(name, call_id="t1", **arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def calls(*tool_calls):
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


async def solve_by_script(env, task_id):
    """A scripted engineer: look around, read the source, write the fix, run the tests, finish."""
    obs, info = await env.areset(options={"task_id": task_id})
    path, fixed = FIXED_SOURCES[task_id.rsplit("-", 1)[0]]
    listing, source = (await env.astep(calls(tool_call("list_files", "a"), tool_call("read_file", "b", path=path))))[0]
    assert path in listing["content"].splitlines() and ".git/HEAD" not in listing["content"]
    separator_line = source["content"].splitlines()[0]  # the slugify task keeps its own separator
    written, *_ = await env.astep(calls(tool_call("write_file", path=path, content=fixed.replace("{separator_line}", separator_line))))
    assert written[0]["content"].startswith(f"Wrote {path}")
    tests, *_ = await env.astep(calls(tool_call("run", command="python3 -m unittest 2>&1 | tail -n 1; git status --short")))
    assert tests[0]["content"].splitlines()[:2] == ["OK", f" M {path}"]
    return await env.astep({"role": "assistant", "content": "Fixed."})


@pytest.fixture
async def repo_env(pool):
    env = CodeExecEnv(pool, family="repo", max_runs=3)
    yield env
    await env.aclose()


async def test_scripted_solution_scores_one_on_every_generated_repo_task(repo_env):
    from miles_envs.envs.code_exec_repo import repo_tasks

    tasks = repo_tasks()
    assert len({t.id for t in tasks}) == 9
    for task in tasks:
        obs, reward, terminated, _, info = await solve_by_script(repo_env, task.id)
        assert (obs, reward, terminated) == ([], 1.0, True), task.id
        assert (info["tests_passed"], info["tests_total"], info["sandbox_runs"]) == (task.test_count, task.test_count, 1)


async def test_unfixed_repo_and_rewritten_tests_do_not_score_one(repo_env):
    await repo_env.areset(options={"task_id": "inventory-0"})
    _, untouched, *_ = await repo_env.astep({"role": "assistant", "content": "done"})
    assert untouched == 0.5  # total_value and remove-all pass; the two raise tests fail
    await repo_env.areset(options={"task_id": "inventory-0"})
    cheat = "import unittest\n\n\nclass StoreTest(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
    await repo_env.astep(calls(tool_call("write_file", path="tests/test_store.py", content=cheat),
                               tool_call("write_file", "t2", path="tests/test_hidden_store.py", content=cheat)))
    _, reward, *_ = await repo_env.astep({"role": "assistant", "content": "done"})
    assert reward == 0.5


async def test_printed_fake_results_do_not_score(repo_env):
    await repo_env.areset(options={"task_id": "intervals-1"})
    fake = "print('@@tests-' + 'a' * 32 + '@@{\"run\": 3, \"failed\": 0}')\n"
    await repo_env.astep(calls(tool_call("write_file", path="schedule/__init__.py", content=fake)))
    _, reward, *_ = await repo_env.astep({"role": "assistant", "content": "done"})
    assert reward < 1.0


async def test_repo_tools_report_bad_calls_and_the_budget(repo_env):
    await repo_env.areset(options={"task_id": "slugify-0"})
    obs, *_ = await repo_env.astep(calls(
        tool_call("read_file", "a", path="../../etc/passwd"),
        tool_call("write_file", "b", path="x.py"),
        tool_call("python", "c", code="1"),
        {"id": "d", "type": "function", "function": {"name": "run", "arguments": "[1]"}},
        tool_call("read_file", "e", path="missing.txt"),
    ))
    assert [m["content"] for m in obs[:4]] == [
        "Error: '../../etc/passwd' is not a path inside the repository.",
        'Error: write_file needs "content", the complete new text of the file.',
        "Error: unknown tool 'python'. The tools are list_files, read_file, write_file, run.",
        'Error: arguments must be a JSON object, like {"path": "README.md"}.',
    ]
    assert "No such file" in obs[4]["content"] and obs[4]["content"].endswith("[exit code 1]")
    runs = [tool_call("run", str(i), command=f"echo {i}") for i in range(4)]
    obs, *_ = await repo_env.astep(calls(*runs, tool_call("read_file", "r", path="textkit/slug.py")))
    assert [m["content"] for m in obs[:4]] == ["0", "1", "2", "Error: no runs left (3 used). Reply without a tool call to finish."]
    assert obs[4]["content"].startswith("SEPARATOR = ")  # reading spends time only, not runs


async def test_repo_episode_gives_its_pooled_sandbox_back(pool):
    env = CodeExecEnv(pool, family="repo")
    await env.areset(seed=3)
    assert pool.idle == 0
    await env.astep({"role": "assistant", "content": "done"})
    assert pool.idle == 1
    await env.areset(seed=4)
    await env.aclose()
    assert pool.idle == 1


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task family 'swe'; CodeExec-v0 has functions, repo"):
        CodeExecEnv("local", family="swe")


def test_repo_family_passes_miles_envs_check():
    import subprocess
    import sys
    from pathlib import Path

    miles_envs = Path(sys.executable).with_name("miles-envs")
    done = subprocess.run([str(miles_envs), "check", "miles/CodeExec-v0",
                           "--kwargs", '{"family": "repo"}'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout


async def test_sandbox_seconds_budget_cuts_the_run_and_then_refuses(pool):
    env = CodeExecEnv(pool, max_runs=None, sandbox_s=0.5)
    await env.areset(options={"problem_id": "fibonacci"})
    first, *_ = await env.astep({"role": "assistant", "tool_calls": [python_call("import time; time.sleep(3)")]})
    second, *_ = await env.astep({"role": "assistant", "tool_calls": [python_call("print(1)")]})
    assert first[0]["content"] == "[timed out: the run was killed]"  # cut at the 0.5 s left, not the 10 s timeout
    assert second[0]["content"] == "Error: no sandbox time left (0.5 s used). Reply with your solution."
    _, reward, _, _, info = await env.astep(answer(REFERENCE["fibonacci"]))
    assert reward == 1.0 and info["sandbox_runs"] == 1 and 0.5 <= info["sandbox_seconds"] < 3


async def test_repo_episodes_through_the_rollout_loop_with_tool_calls_as_tokens(pool):
    """The whole stack: a scripted model writes hermes tool calls as text, the loop parses them,
    the env edits the repo in the sandbox, and the repo's tests give the reward."""
    import re

    from miles_envs.agents.scripted import ScriptedEngine
    from miles_envs.chat import ChatRenderer
    from miles_envs.loop import LoopConfig, rollout
    from miles_envs.tokenizers import load_tokenizer
    from miles_envs.trajectory import Status

    qwen3 = load_tokenizer("qwen3")

    def engineer(context):
        text = qwen3.decode(context.input_ids)
        turn = text.count("<|im_start|>assistant") - 1
        task = next(name for name, marker in (("inventory", "Store.remove"), ("slugify", "slugify"), ("intervals", "merge"))
                    if marker in text)
        path, fixed = FIXED_SOURCES[task]
        if task == "slugify":
            separator = re.search(r"joined by a single '(.)'", text).group(1)
            fixed = fixed.replace("{separator_line}", f"SEPARATOR = {separator!r}")
        calls = [{"name": "write_file", "arguments": {"path": path, "content": fixed}},
                 {"name": "run", "arguments": {"command": "python3 -m unittest 2>&1 | tail -n 1"}}]
        if turn < len(calls):
            return f"<tool_call>\n{json.dumps(calls[turn])}\n</tool_call>"
        return "The tests pass now."

    trajectories = [t async for t in rollout(lambda: CodeExecEnv(pool, family="repo"), ScriptedEngine(qwen3, engineer),
                                             ChatRenderer(qwen3), n=6, config=LoopConfig(max_turns=6), seed=0)]
    assert sorted(t.status for t in trajectories) == [Status.COMPLETED] * 6
    assert [t.reward for t in trajectories] == [1.0] * 6
    for t in trajectories:
        assert [turn.kind for turn in t.turns].count("model") == 3
        tool_outputs = [m["content"] for m in t.messages if m["role"] == "tool"]
        assert tool_outputs[0].startswith("Wrote ") and tool_outputs[1] == "OK"
        assert 0 < sum(t.loss_mask) < len(t.loss_mask)  # tool results are env tokens
