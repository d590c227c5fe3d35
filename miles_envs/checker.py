"""Conformance checker for environments (``miles-envs check`` and ``miles_envs.check_env``).

Runs the env under a scripted policy and reports every contract it breaks, each with the env's own
traceback where it raised, instead of stopping at the first problem.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from miles_envs.checker_common import (
    DEFAULT_STEP_CAP,
    CheckReport,
    EnvCheckError,
    EnvRaised,
    canonical,
    check_close,
    check_replays,
    describe_shape,
    finish_report,
    guarded,
    message_problem,
    reset_problem,
)
from miles_envs.checker_multi import check_multi_agent_env
from miles_envs.env import Env, Message, assistant

__all__ = ["CheckReport", "EnvCheckError", "check_env"]

Policy = Callable[[list[Message]], Message]


def default_policy(history: list[Message]) -> Message:
    return assistant("42")


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

