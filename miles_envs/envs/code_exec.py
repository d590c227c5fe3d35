"""``miles/CodeExec-v0``: code tasks graded by tests run in a sandbox. Two task families:

- ``family="functions"`` (default): write a Python function; reward = fraction of hidden unit tests
  passed. The model may call the ``python`` tool to run code in the sandbox and read the output,
  then answers with the function in a ```python fenced block. The hidden tests run in the sandbox
  too, but only their inputs go in: the function's outputs come back as JSON and are compared with
  the expected values here, so code in the sandbox cannot see (or forge) what counts as correct.
- ``family="repo"``: fix an issue in a small generated repository through file and shell tools
  over several turns; reward = fraction of the repository's tests passing (see code_exec_repo.py).

Every episode spends from a :class:`SandboxBudget` (``max_runs`` executions, ``sandbox_s`` seconds).
"""

from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, system, user
from miles_envs.envs.exec_feedback import format_exec_result  # noqa: F401  (also part of this module's API)
from miles_envs.sandbox import Limits, Sandbox, SandboxPool, make_sandbox
from miles_envs.sandbox.budget import SandboxBudget

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python 3 code in a sandbox without network access and return its stdout and stderr.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python source to run."}},
            "required": ["code"],
        },
    },
}
SYSTEM_PROMPT = (
    "You solve Python programming problems. You may call the `python` tool to run code and see its "
    "output. When you are done, reply with the complete function in one ```python code block."
)
_FENCED_PYTHON = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)
# Runs the candidate on each test's arguments with a per-test alarm and prints the results as JSON.
_HARNESS = """
import json, signal

def _alarm(signum, frame):
    raise TimeoutError("test took longer than {per_test_s}s")

signal.signal(signal.SIGALRM, _alarm)
_results = []
_namespace = {{"__name__": "solution"}}
try:
    exec(compile({solution!r}, "solution.py", "exec"), _namespace)
    _function = _namespace[{entry_point!r}]
except BaseException as error:
    _function, _setup_error = None, repr(error)
for _args in json.loads({arguments!r}):
    if _function is None:
        _results.append({{"error": _setup_error}})
        continue
    signal.setitimer(signal.ITIMER_REAL, {per_test_s})
    try:
        _results.append({{"value": _function(*_args)}})
    except BaseException as error:
        _results.append({{"error": repr(error)}})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
print({marker!r} + json.dumps(_results, default=repr))
"""


FAMILIES = ("functions", "repo")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    entry_point: str
    tests: tuple[dict[str, Any], ...]


def load_problems() -> list[Problem]:
    """The built-in problem set (miles_envs/envs/data/code_exec_problems.jsonl)."""
    text = resources.files("miles_envs.envs").joinpath("data/code_exec_problems.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Problem(r["id"], r["prompt"], r["entry_point"], tuple(r["tests"])) for r in rows]


async def run_python(code: str, sandbox: Sandbox | SandboxPool) -> str:
    """The ``python`` tool: run ``code`` in a sandbox (or a pooled one) and describe the outcome."""
    return format_exec_result(await sandbox.run(code, language="python"))


def extract_solution(content: str | None) -> str | None:
    """The last ```python fenced block of a reply, or None."""
    blocks = _FENCED_PYTHON.findall(content or "")
    return blocks[-1] if blocks else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class CodeExecEnv(Env):
    """One programming task per episode; see the module docstring.

    ``sandbox`` is a backend name (the env then owns one sandbox and closes it), a Sandbox, or a
    pool shared by many envs (SandboxPool, RaySandboxPool). ``max_runs`` bounds the code runs per
    episode (``python`` calls; ``run`` commands in the repo family, whose file tools spend only
    time) and ``sandbox_s`` their summed seconds.
    """

    max_turns = 6

    def __init__(
        self,
        sandbox: str | Sandbox | SandboxPool = "local",
        *,
        family: str = "functions",
        max_runs: int | None = 4,
        sandbox_s: float | None = None,
        timeout: float = 10.0,
        per_test_s: float = 2.0,
        limits: Limits | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r}; CodeExec-v0 has {', '.join(FAMILIES)}")
        self._owns_sandbox = isinstance(sandbox, str)
        self._backend = sandbox if isinstance(sandbox, str) else None
        self._sandbox: Sandbox | SandboxPool | None = None if self._owns_sandbox else sandbox
        self.family = family
        self.budget = SandboxBudget(runs=max_runs, seconds=sandbox_s)
        self.meter = self.budget.meter()
        self.repo = None
        if family == "repo":
            from miles_envs.envs.code_exec_repo import RepoFamily  # lazy: only the repo family needs it

            self.repo = RepoFamily()
        self.timeout = timeout
        self.per_test_s = per_test_s
        self.limits = limits or Limits()
        self.problems = problems or load_problems()
        self.problem: Problem | None = None

    @property
    def sandbox(self) -> Sandbox | SandboxPool:
        if self._sandbox is None:
            self._sandbox = make_sandbox(self._backend, limits=self.limits, timeout=self.timeout)
        return self._sandbox

    async def areset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        options = options or {}
        self.meter = self.budget.meter()
        if self.repo is not None:
            return await self.repo.reset(self.sandbox, self.meter, self.timeout, self.limits, seed, options)
        if "problem_id" in options:
            matches = [p for p in self.problems if p.id == options["problem_id"]]
            if not matches:
                known = ", ".join(p.id for p in self.problems)
                raise ValueError(f"unknown problem_id {options['problem_id']!r}; known: {known}")
            self.problem = matches[0]
        else:
            self.problem = random.Random(seed).choice(self.problems)
        prompt = f"{self.problem.prompt}\n\nDefine the function `{self.problem.entry_point}`."
        return [system(SYSTEM_PROMPT), user(prompt)], {"tools": [PYTHON_TOOL], "problem_id": self.problem.id}

    async def astep(self, action: Message) -> StepResult:
        if self.repo is not None:
            result = await self.repo.step(action)
            if result[2]:
                # An owned sandbox lives one repo episode: the next may run on another event loop.
                await self._close_sandbox()
            return result
        if self.problem is None:
            raise RuntimeError("step() before reset(): call reset() first")
        if action.get("tool_calls"):
            return [await self._tool_reply(call) for call in action["tool_calls"]], 0.0, False, False, {}
        solution = extract_solution(action.get("content"))
        if solution is None:
            info = {"reward_components": {"tests_passed": 0.0, "format": 0.0}, "tests_passed": 0, **self.meter.usage()}
            return [], 0.0, True, False, info
        passed, total = await self.grade(solution)
        fraction = passed / total
        info = {
            "reward_components": {"tests_passed": fraction, "format": 1.0},
            "tests_passed": passed,
            "tests_total": total,
            **self.meter.usage(),
        }
        return [], fraction, True, False, info

    async def grade(self, solution: str) -> tuple[int, int]:
        """Run the hidden tests on ``solution``; return (passed, total)."""
        assert self.problem is not None
        tests = self.problem.tests
        marker = f"@@results-{uuid.uuid4().hex}@@"
        harness = _HARNESS.format(
            solution=solution,
            entry_point=self.problem.entry_point,
            arguments=json.dumps([t["args"] for t in tests]),
            per_test_s=self.per_test_s,
            marker=marker,
        )
        budget = self.per_test_s * len(tests) + 2.0
        result = await self.sandbox.run(harness, timeout=budget, limits=self.limits)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        if not lines:
            return 0, len(tests)
        try:
            outcomes = json.loads(lines[-1][len(marker) :])
        except json.JSONDecodeError:
            return 0, len(tests)
        passed = sum(
            "value" in outcome and _canonical(outcome["value"]) == _canonical(test["expected"])
            for outcome, test in zip(outcomes, tests)
        )
        return passed, len(tests)

    async def _tool_reply(self, call: dict[str, Any]) -> Message:
        function = call.get("function", {})
        name = function.get("name")
        reply = {"role": "tool", "tool_call_id": call.get("id"), "name": name}
        if name != "python":
            return {**reply, "content": f"Error: unknown tool {name!r}. The only tool is 'python'."}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
            code = arguments["code"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return {**reply, "content": 'Error: arguments must be JSON like {"code": "print(1)"}.'}
        refusal = self.meter.refusal()
        if refusal:
            return {**reply, "content": f"Error: {refusal}. Reply with your solution."}
        result = await self.sandbox.run(code, language="python", timeout=self.meter.timeout(self.timeout))
        self.meter.charge(result)
        return {**reply, "content": format_exec_result(result)}

    async def aclose(self) -> None:
        await self._close_sandbox()
        super().close()

    def close(self) -> None:
        """Sync twin of aclose for envs driven through reset/step (async users call aclose)."""
        if self._loop_thread is not None:
            self._run_sync(self._close_sandbox())
        super().close()

    async def _close_sandbox(self) -> None:
        if self.repo is not None:
            await self.repo.end()
        if self._owns_sandbox and self._sandbox is not None:
            sandbox, self._sandbox = self._sandbox, None
            await sandbox.close()
