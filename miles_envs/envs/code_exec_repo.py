"""The repository task family of ``miles/CodeExec-v0`` (``family="repo"``): SWE-style episodes.

Each episode puts a small Python project (a git repo where the sandbox has git) in a sandbox
session: an issue to fix, source files, visible unit tests. Over several turns the model lists,
reads and writes files and runs commands through tools; a reply without a tool call ends the
episode. Grading writes the task's tests over the repo (the visible ones restored, hidden ones
added), runs them with ``unittest`` in a fresh interpreter in the same sandbox, and the reward is
the fraction that pass. The results come back behind a per-grading random marker, so printing a
fake summary does not score; like any in-process test run, code written to hunt for the marker
could forge it, which is why the marker is fresh each time and never shown to the model.

The tasks are generated here from templates and a variant number (no downloads), so there are
as many as ``variants`` × templates, each with its own constants.
"""

from __future__ import annotations

import json
import posixpath
import random
import shlex
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from miles_envs.envs.exec_feedback import format_exec_result
from miles_envs.env import Message, ResetResult, StepResult, system, user
from miles_envs.sandbox import ExecResult, Limits
from miles_envs.sandbox.budget import BudgetMeter

SYSTEM_PROMPT = (
    "You are a software engineer working in a git repository inside a sandbox without network access. "
    "Use the tools to look at the code, edit files and run commands (for example `python3 -m unittest`). "
    "When the issue is fixed, reply with a short summary and no tool call; the repository's tests then decide "
    "your reward."
)


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": "string", "description": d} for p, d in params.items()},
                "required": list(params),
            },
        },
    }


REPO_TOOLS: list[dict[str, Any]] = [
    _tool("list_files", "List the repository's files."),
    _tool("read_file", "Return the content of a file.", path="Path relative to the repository root."),
    _tool("write_file", "Create or replace a file with the given content.",
          path="Path relative to the repository root.", content="The complete new content of the file."),
    _tool("run", "Run a bash command in the repository root and return its output.", command="The command."),
]
TOOL_NAMES = tuple(tool["function"]["name"] for tool in REPO_TOOLS)
GIT_INIT = (
    "if command -v git >/dev/null; then git init -q --template= && git add -A && "
    "git -c user.name=miles-envs -c user.email=env@localhost commit -qm 'initial import'; fi"
)
LIST_FILES = "find . -path ./.git -prune -o -type f -print | sed 's|^./||' | sort"
# Runs the named test modules in a fresh interpreter and prints the counts after the marker.
GRADER = """
import json, sys, unittest
sys.path.insert(0, ".")
result = unittest.TestResult()
unittest.defaultTestLoader.loadTestsFromNames({modules!r}).run(result)
print({marker!r} + json.dumps({{"run": result.testsRun, "failed": len(result.failures) + len(result.errors)}}))
"""


@dataclass(frozen=True)
class RepoTask:
    """A repository at the start of an episode and the tests that grade it."""

    id: str
    issue: str
    files: dict[str, str]
    tests: dict[str, str]  # written over the repository at grading: the visible tests and hidden ones
    test_count: int

    @property
    def test_modules(self) -> list[str]:
        return sorted(path[: -len(".py")].replace("/", ".") for path in self.tests)


def _inventory(variant: int) -> RepoTask:
    rng = random.Random(f"inventory-{variant}")
    item, price, stock = rng.choice(["bolt", "nut", "gear", "valve"]), rng.randint(2, 40), rng.randint(3, 9)
    store = (
        "class Store:\n"
        "    def __init__(self):\n        self.stock = {}\n        self.prices = {}\n\n"
        "    def add(self, name, count, price):\n"
        "        self.stock[name] = self.stock.get(name, 0) + count\n        self.prices[name] = price\n\n"
        "    def remove(self, name, count):\n        self.stock[name] = self.stock.get(name, 0) - count\n\n"
        "    def total_value(self):\n        return sum(self.stock[n] * self.prices[n] for n in self.stock)\n"
    )
    visible = (
        "import unittest\nfrom inventory.store import Store\n\n\nclass StoreTest(unittest.TestCase):\n"
        f"    def test_total_value(self):\n        s = Store()\n        s.add({item!r}, {stock}, {price})\n"
        f"        self.assertEqual(s.total_value(), {stock * price})\n\n"
        f"    def test_remove_too_many_raises(self):\n        s = Store()\n        s.add({item!r}, {stock}, {price})\n"
        f"        with self.assertRaises(ValueError):\n            s.remove({item!r}, {stock + 1})\n"
        f"        self.assertEqual(s.stock[{item!r}], {stock})\n"
    )
    hidden = (
        "import unittest\nfrom inventory.store import Store\n\n\nclass HiddenStoreTest(unittest.TestCase):\n"
        f"    def test_remove_unknown_raises(self):\n        with self.assertRaises(ValueError):\n"
        f"            Store().remove('missing', 1)\n\n"
        f"    def test_remove_all_keeps_total_right(self):\n        s = Store()\n        s.add({item!r}, {stock}, {price})\n"
        f"        s.remove({item!r}, {stock})\n        self.assertEqual(s.total_value(), 0)\n"
    )
    return RepoTask(
        id=f"inventory-{variant}",
        issue="`Store.remove` lets stock go negative. Removing more than is in stock, or an item the store does "
        "not have, must raise ValueError and leave the stock unchanged.",
        files={"inventory/__init__.py": "", "inventory/store.py": store, "tests/__init__.py": "",
               "tests/test_store.py": visible, "README.md": "# inventory\n\nA tiny stock keeper.\n"},
        tests={"tests/test_store.py": visible, "tests/test_hidden_store.py": hidden},
        test_count=4,
    )


def _slugify(variant: int) -> RepoTask:
    rng = random.Random(f"slugify-{variant}")
    sep = rng.choice(["-", "_"])
    words = rng.sample(["Hello", "World", "Agent", "Sandbox", "Repo", "Policy"], 3)
    title = f"  {words[0]},  {words[1]}! {words[2]}?  "
    expected = sep.join(w.lower() for w in words)
    text = f'SEPARATOR = {sep!r}\n\n\ndef slugify(title):\n    return title.lower().replace(" ", SEPARATOR)\n'
    visible = (
        "import unittest\nfrom textkit.slug import slugify\n\n\nclass SlugTest(unittest.TestCase):\n"
        f"    def test_punctuation_and_spaces(self):\n        self.assertEqual(slugify({title!r}), {expected!r})\n"
    )
    hidden = (
        "import unittest\nfrom textkit.slug import slugify\n\n\nclass HiddenSlugTest(unittest.TestCase):\n"
        f"    def test_digits_stay(self):\n        self.assertEqual(slugify('Top 10 Tips'), {sep.join(['top', '10', 'tips'])!r})\n\n"
        "    def test_empty(self):\n        self.assertEqual(slugify('  !! '), '')\n"
    )
    return RepoTask(
        id=f"slugify-{variant}",
        issue=f"`slugify` must keep only letters and digits: lower-case words joined by a single {sep!r}, with no "
        "leading or trailing separator (punctuation and runs of spaces are dropped).",
        files={"textkit/__init__.py": "", "textkit/slug.py": text, "tests/__init__.py": "",
               "tests/test_slug.py": visible},
        tests={"tests/test_slug.py": visible, "tests/test_hidden_slug.py": hidden},
        test_count=3,
    )


def _intervals(variant: int) -> RepoTask:
    rng = random.Random(f"intervals-{variant}")
    a, gap = rng.randint(0, 5), rng.randint(2, 4)
    text = (
        "def merge(intervals):\n    out = []\n    for start, end in sorted(intervals):\n"
        "        if out and start < out[-1][1]:\n            out[-1][1] = end\n"
        "        else:\n            out.append([start, end])\n    return out\n"
    )
    visible = (
        "import unittest\nfrom schedule.merge import merge\n\n\nclass MergeTest(unittest.TestCase):\n"
        f"    def test_touching_slots_merge(self):\n"
        f"        self.assertEqual(merge([[{a}, {a + gap}], [{a + gap}, {a + 2 * gap}]]), [[{a}, {a + 2 * gap}]])\n"
    )
    hidden = (
        "import unittest\nfrom schedule.merge import merge\n\n\nclass HiddenMergeTest(unittest.TestCase):\n"
        f"    def test_contained_slot(self):\n        self.assertEqual(merge([[{a}, {a + 3 * gap}], [{a + 1}, {a + 2}]]), "
        f"[[{a}, {a + 3 * gap}]])\n\n"
        f"    def test_apart(self):\n        self.assertEqual(merge([[5, 6], [1, 2]]), [[1, 2], [5, 6]])\n"
    )
    return RepoTask(
        id=f"intervals-{variant}",
        issue="`merge` must merge slots that touch (one ends where the next starts) and must never shrink a slot "
        "that contains a later one.",
        files={"schedule/__init__.py": "", "schedule/merge.py": text, "tests/__init__.py": "",
               "tests/test_merge.py": visible},
        tests={"tests/test_merge.py": visible, "tests/test_hidden_merge.py": hidden},
        test_count=3,
    )


TEMPLATES = (_inventory, _slugify, _intervals)


def repo_tasks(variants: int = 3) -> list[RepoTask]:
    """The generated tasks: every template at variants 0..variants-1."""
    return [template(v) for v in range(variants) for template in TEMPLATES]


def _clean_path(path: Any) -> str | None:
    """A repository-relative path, or None when it is empty, absolute or leaves the repository."""
    if not isinstance(path, str) or not path.strip():
        return None
    normal = posixpath.normpath(path.strip())
    if normal.startswith(("/", "..")) or normal == ".":
        return None
    return normal


class RepoEpisode:
    """One task in one sandbox session: the tools, then the grading."""

    def __init__(self, task: RepoTask, session: Any, meter: BudgetMeter, timeout: float, limits: Limits) -> None:
        self.task = task
        self.session = session
        self.meter = meter
        self.timeout = timeout
        self.limits = limits

    async def execute(self, command: str, *, files: dict[str, str] | None = None, stdin: str | None = None,
                      run: bool = True, timeout: float | None = None) -> ExecResult:
        timeout = self.meter.timeout(self.timeout) if timeout is None else timeout
        result = await self.session.run(command, language="bash", files=files, stdin=stdin, timeout=timeout,
                                        limits=self.limits)
        self.meter.charge(result, run=run)
        return result

    async def tool(self, name: str, arguments: dict[str, Any]) -> str:
        """The text the model sees for one tool call."""
        if name not in TOOL_NAMES:
            return f"Error: unknown tool {name!r}. The tools are {', '.join(TOOL_NAMES)}."
        refusal = self.meter.refusal(run=name == "run")
        if refusal:
            return f"Error: {refusal}. Reply without a tool call to finish."
        if name == "list_files":
            return format_exec_result(await self.execute(LIST_FILES, run=False))
        if name in ("read_file", "write_file"):
            path = _clean_path(arguments.get("path"))
            if path is None:
                return f"Error: {arguments.get('path')!r} is not a path inside the repository."
            if name == "read_file":
                return format_exec_result(await self.execute(f"cat -- {shlex.quote(path)}", run=False))
            content = arguments.get("content")
            if not isinstance(content, str):
                return 'Error: write_file needs "content", the complete new text of the file.'
            result = await self.execute("true", files={path: content}, run=False)
            return f"Wrote {path} ({len(content)} characters)." if result.ok else format_exec_result(result)
        command = arguments.get("command")
        if not isinstance(command, str) or not command.strip():
            return 'Error: run needs "command", a bash command line.'
        return format_exec_result(await self.execute(command))

    async def grade(self) -> tuple[int, int]:
        """Write the task's tests over the repo, run them; return (passed, total)."""
        marker = f"@@tests-{uuid.uuid4().hex}@@"
        grader = GRADER.format(modules=self.task.test_modules, marker=marker)
        result = await self.session.run("python3 -", language="bash", files=self.task.tests, stdin=grader,
                                        timeout=max(self.timeout, 30.0), limits=self.limits)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        total = self.task.test_count
        if not lines:
            return 0, total
        try:
            counts = json.loads(lines[-1][len(marker):])
            passed = int(counts["run"]) - int(counts["failed"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return 0, total
        return max(0, min(passed, total)), total


class RepoFamily:
    """What ``CodeExecEnv(family="repo")`` does at reset and step."""

    def __init__(self, tasks: list[RepoTask] | None = None) -> None:
        self.tasks = tasks or repo_tasks()
        self.episode: RepoEpisode | None = None
        self._stack: AsyncExitStack | None = None

    async def reset(self, sandbox: Any, meter: BudgetMeter, timeout: float, limits: Limits,
                    seed: int | None, options: dict[str, Any]) -> ResetResult:
        await self.end()
        task = self._pick(seed, options)
        self._stack = AsyncExitStack()
        session = await self._stack.enter_async_context(sandbox.session())
        self.episode = RepoEpisode(task, session, meter, timeout, limits)
        setup = await session.run(GIT_INIT, language="bash", files=task.files, timeout=30.0, limits=limits)
        if not setup.ok:
            await self.end()
            raise RuntimeError(f"the {task.id} repository could not be set up in the sandbox: {format_exec_result(setup)}")
        prompt = f"Issue in this repository:\n\n{task.issue}\n\nFix it so the repository's tests pass."
        return [system(SYSTEM_PROMPT), user(prompt)], {"tools": REPO_TOOLS, "task_id": task.id}

    def _pick(self, seed: int | None, options: dict[str, Any]) -> RepoTask:
        if "task_id" not in options:
            return random.Random(seed).choice(self.tasks)
        for task in self.tasks:
            if task.id == options["task_id"]:
                return task
        raise ValueError(f"unknown task_id {options['task_id']!r}; known: {', '.join(t.id for t in self.tasks)}")

    async def step(self, action: Message) -> StepResult:
        episode = self.episode
        if episode is None:
            raise RuntimeError("step() before reset(): call reset() first")
        if action.get("tool_calls"):
            return [await self._reply(call, episode) for call in action["tool_calls"]], 0.0, False, False, {}
        try:
            passed, total = await episode.grade()
        finally:
            usage = episode.meter.usage()
            await self.end()
        fraction = passed / total
        info = {"reward_components": {"tests_passed": fraction}, "tests_passed": passed, "tests_total": total, **usage}
        return [], fraction, True, False, info

    @staticmethod
    async def _reply(call: dict[str, Any], episode: RepoEpisode) -> Message:
        function = call.get("function", {})
        name = function.get("name")
        reply = {"role": "tool", "tool_call_id": call.get("id"), "name": name}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            return {**reply, "content": 'Error: arguments must be a JSON object, like {"path": "README.md"}.'}
        return {**reply, "content": await episode.tool(name, arguments)}

    async def end(self) -> None:
        """Give the episode's sandbox session back."""
        stack, self._stack, self.episode = self._stack, None, None
        if stack is not None:
            await stack.aclose()
