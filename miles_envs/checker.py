"""Conformance checker for environments (``miles-envs check`` and ``miles_envs.check_env``).

Runs the env under a scripted policy and reports every contract it breaks, each with the env's own
traceback where it raised, instead of stopping at the first problem.
"""

from __future__ import annotations

import asyncio
import json
import numbers
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miles_envs.env import Env, Message, assistant

DEFAULT_STEP_CAP = 64
ROLES = {"system", "user", "assistant", "tool", "ipython", "developer"}

Policy = Callable[[list[Message]], Message]


def default_policy(history: list[Message]) -> Message:
    return assistant("42")


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


def _step_problem(result: Any) -> str | None:
    if not isinstance(result, tuple) or len(result) != 5:
        return f"step() must return (observation, reward, terminated, truncated, info), got {describe_shape(result)}"
    obs, reward, terminated, truncated, info = result
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
        return f"step() reward must be a number, got {type(reward).__name__}"
    if not isinstance(terminated, bool) or not isinstance(truncated, bool):
        return f"step() terminated/truncated must be bool, got {type(terminated).__name__}/{type(truncated).__name__}"
    if not isinstance(info, dict):
        return f"step() info must be a dict, got {type(info).__name__}"
    components = info.get("reward_components")
    if components is not None and not (isinstance(components, dict) and all(isinstance(v, numbers.Real) for v in components.values())):
        return 'info["reward_components"] must map names to numbers'
    return message_problem(obs, "step()")


def describe_shape(value: Any) -> str:
    return f"a {len(value)}-tuple" if isinstance(value, tuple) else type(value).__name__


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


class _Episode:
    """One scripted episode, recorded as a comparable trace."""

    def __init__(self, policy: Policy, cap: int) -> None:
        self.policy, self.cap = policy, cap
        self.trace: list[str] = []
        self.problems: list[str] = []
        self.ended = False
        self.steps = 0

    def run_sync(self, env: Env, seed: int) -> _Episode:
        try:
            result = env.reset(seed=seed)
        except Exception as exc:
            raise EnvRaised("reset()", exc) from exc
        history = self._record_reset(result)
        while history is not None and self.steps < self.cap:
            action = self.policy(history)
            try:
                result = env.step(action)
            except Exception as exc:
                raise EnvRaised(f"step() #{self.steps + 1}", exc) from exc
            history = self._record_step(history, action, result)
        return self

    async def run_async(self, env: Env, seed: int) -> _Episode:
        try:
            result = await env.areset(seed=seed)
        except Exception as exc:
            raise EnvRaised("areset()", exc) from exc
        history = self._record_reset(result)
        while history is not None and self.steps < self.cap:
            action = self.policy(history)
            try:
                result = await env.astep(action)
            except Exception as exc:
                raise EnvRaised(f"astep() #{self.steps + 1}", exc) from exc
            history = self._record_step(history, action, result)
        return self

    def _record_reset(self, result: Any) -> list[Message] | None:
        problem = reset_problem(result)
        if problem:
            self.problems.append(problem)
            return None
        obs, info = result
        self.trace.append(canonical([obs, info]))
        return list(obs)

    def _record_step(self, history: list[Message], action: Message, result: Any) -> list[Message] | None:
        self.steps += 1
        problem = _step_problem(result)
        if problem:
            self.problems.append(problem)
            return None
        obs, reward, terminated, truncated, info = result
        self.trace.append(canonical([obs, float(reward), terminated, truncated, info]))
        if terminated or truncated:
            self.ended = True
            return None
        return [*history, action, *obs]


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


def check_env(
    env: Env,
    *,
    seed: int = 0,
    policy: Policy | None = None,
    max_steps: int | None = None,
    raise_on_failure: bool = True,
    name: str | None = None,
) -> CheckReport:
    """Check ``env`` against the Env contract; raise ``EnvCheckError`` (or return the report)."""
    if getattr(env, "multi_agent", False):
        from miles_envs.checker_multi import check_multi_agent_env

        return check_multi_agent_env(env, seed=seed, raise_on_failure=raise_on_failure, name=name)
    spec = getattr(env, "spec", None)
    report = CheckReport(name or (spec.id if spec is not None else type(env).__name__))
    policy = policy or default_policy
    cap = max_steps or env.max_turns or DEFAULT_STEP_CAP
    if not isinstance(env, Env):
        report.add("is an Env", False, f"{type(env).__name__} does not subclass miles_envs.Env")
        return finish_report(report, raise_on_failure)

    first = guarded(report, "reset/step types", lambda: _Episode(policy, cap).run_sync(env, seed))
    if first is not None:
        report.add("reset/step types", not first.problems, "; ".join(first.problems))
        if not first.problems:
            limit = f"max_turns={env.max_turns}" if env.max_turns else f"{cap} steps (max_turns unset)"
            report.add(
                "terminates within max_turns", first.ended,
                "" if first.ended else f"no terminated/truncated within {limit} under the scripted policy",
            )
            check_replays(
                report, first.trace,
                lambda: _Episode(policy, cap).run_sync(env, seed),
                lambda: _Episode(policy, cap).run_async(env, seed),
            )
    check_close(report, env)
    return finish_report(report, raise_on_failure)


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
