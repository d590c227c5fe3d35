"""What the single- and multi-agent conformance checkers share: the report, the message and reset
contracts, and the replay / close checks."""

from __future__ import annotations

import asyncio
import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miles_envs.env import Env

DEFAULT_STEP_CAP = 64
ROLES = {"system", "user", "assistant", "tool", "ipython", "developer"}


class EnvCheckError(AssertionError):
    def __init__(self, report: CheckReport) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class CheckReport:
    env_name: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    def add(self, name: str, passed: bool, detail: str = "") -> None:
        self.results.append(CheckResult(name, passed, detail))

    def summary(self) -> str:
        lines = [f"{self.env_name}: {'passed' if self.ok else 'FAILED'}"]
        for r in self.results:
            lines.append(f"  [{'ok' if r.passed else 'FAIL'}] {r.name}" + (f": {r.detail}" if r.detail else ""))
        return "\n".join(lines)


class EnvRaised(Exception):
    def __init__(self, where: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        super().__init__(f"{where} raised {type(exc).__name__}: {exc}\n{tb}")


def message_problem(obs: Any, where: str) -> str | None:
    if not isinstance(obs, list):
        return f"{where}: observation must be a list of message dicts, got {type(obs).__name__}"
    for i, message in enumerate(obs):
        if not isinstance(message, dict):
            return f"{where}: observation[{i}] must be a dict message, got {type(message).__name__}"
        if message.get("role") not in ROLES:
            return f"{where}: observation[{i}] has role {message.get('role')!r}; use one of {sorted(ROLES)}"
        if not isinstance(message.get("content"), (str, type(None))):
            return f"{where}: observation[{i}].content must be a string, got {type(message.get('content')).__name__}"
    return None


def reset_problem(result: Any) -> str | None:
    if not isinstance(result, tuple) or len(result) != 2:
        return f"reset() must return (observation, info), got {describe_shape(result)}"
    obs, info = result
    if not isinstance(info, dict):
        return f"reset() info must be a dict, got {type(info).__name__}"
    tools = info.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) and "function" in t for t in tools)):
        return 'info["tools"] must be a list of OpenAI function schemas ({"type": "function", "function": {...}})'
    return message_problem(obs, "reset()")


def describe_shape(value: Any) -> str:
    return f"a {len(value)}-tuple" if isinstance(value, tuple) else type(value).__name__


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def run_coroutine(coro):
    """asyncio.run, also when the caller already runs an event loop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_replays(report: CheckReport, trace: list[str], replay: Callable[[], Any], replay_async: Callable[[], Any]) -> None:
    """The same seed replays the same episode, through the sync and the async flavour alike."""
    second = guarded(report, "same seed, same episode", replay)
    if second is not None:
        report.add("same seed, same episode", second.trace == trace, first_difference(trace, second.trace))
    async_run = guarded(report, "sync and async agree", lambda: run_coroutine(replay_async()))
    if async_run is not None:
        report.add("sync and async agree", async_run.trace == trace, first_difference(trace, async_run.trace))


def check_close(report: CheckReport, env: Env) -> None:
    def close_twice() -> bool:
        env.close()
        env.close()
        return True

    if guarded(report, "close() idempotent", close_twice):
        report.add("close() idempotent", True)


def guarded(report: CheckReport, name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except EnvRaised as exc:
        report.add(name, False, str(exc))
    except Exception as exc:
        report.add(name, False, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return None


def first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            where = "reset" if i == 0 else f"step {i}"
            return f"first difference at {where}: {x[:200]} != {y[:200]}"
    if len(a) != len(b):
        return f"episode lengths differ: {len(a) - 1} vs {len(b) - 1} steps"
    return ""


def finish_report(report: CheckReport, raise_on_failure: bool) -> CheckReport:
    if raise_on_failure and not report.ok:
        raise EnvCheckError(report)
    return report
