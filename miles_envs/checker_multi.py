"""Conformance checks for multi-agent environments, in the spirit of PettingZoo's ``api_test``.

A probe policy plays every seat; each of its actions carries a reasoning canary (reasoning is
private to the agent that wrote it). The checks: reset/step types, legal agent order (the selected
agent is always live, finished agents are never selected), per-agent observation isolation (no
message object shared between agents, no reasoning canary and no declared ``private_view`` ever in
another agent's observation), termination within ``max_turns``, determinism under a seed, sync and
async flavours agreeing, and an idempotent ``close``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from miles_envs.checker_common import (
    DEFAULT_STEP_CAP,
    canonical,
    check_close,
    check_replays,
    CheckReport,
    describe_shape,
    EnvRaised,
    finish_report,
    guarded,
    message_problem,
    reset_problem,
)
from miles_envs.env import Message, MultiAgentEnv, assistant

MultiPolicy = Callable[[str, list[Message], int], Message]
TYPES, ORDER, ISOLATION = "reset/step types", "legal agent order", "observation isolation"


def reasoning_canary(agent: str, step: int) -> str:
    return f"private-reasoning-of-{agent}-at-{step}"


def probe_policy(agent: str, history: list[Message], step: int) -> Message:
    """Writes ``n + n`` with ``n`` cycling through 1…9 (a move, a number, or a valid expression,
    whichever the env reads) and a reasoning canary."""
    n = step % 9 + 1
    action = assistant(f"{n} + {n}")
    action["reasoning_content"] = reasoning_canary(agent, step)
    return action


class _MultiEpisode:
    """One probe episode over all seats, recorded as a comparable trace plus problems per check."""

    def __init__(self, env: MultiAgentEnv, policy: MultiPolicy, cap: int) -> None:
        self.env, self.policy, self.cap = env, policy, cap
        self.trace: list[str] = []
        self.problems: dict[str, list[str]] = {TYPES: [], ORDER: [], ISOLATION: []}
        self.histories: dict[str, list[Message]] = {}
        self.secrets: dict[str, list[str]] = {}  # agent -> text no other agent may see
        self.live: list[str] = []
        self.ended = False
        self.steps = 0

    # -- drivers -------------------------------------------------------------------------------
    def run_sync(self, seed: int) -> _MultiEpisode:
        try:
            result = self.env.reset(seed=seed)
        except Exception as exc:
            raise EnvRaised("reset()", exc) from exc
        going = self._record_reset(result)
        while going and self.steps < self.cap:
            agent, action = self._next_action()
            try:
                result = self.env.step(action)
            except Exception as exc:
                raise EnvRaised(f"step() #{self.steps + 1} by {agent!r}", exc) from exc
            going = self._record_step(agent, action, result)
        return self

    async def run_async(self, seed: int) -> _MultiEpisode:
        try:
            result = await self.env.areset(seed=seed)
        except Exception as exc:
            raise EnvRaised("areset()", exc) from exc
        going = self._record_reset(result)
        while going and self.steps < self.cap:
            agent, action = self._next_action()
            try:
                result = await self.env.astep(action)
            except Exception as exc:
                raise EnvRaised(f"astep() #{self.steps + 1} by {agent!r}", exc) from exc
            going = self._record_step(agent, action, result)
        return self

    def _next_action(self) -> tuple[str, Message]:
        agent = self.env.agent_selection
        action = self.policy(agent, list(self.histories[agent]), self.steps)
        if action.get("reasoning_content"):
            self.secrets[agent].append(action["reasoning_content"])
        self.histories[agent].append(action)
        return agent, action

    # -- recording -----------------------------------------------------------------------------
    def _problem(self, check: str, text: str) -> bool:
        self.problems[check].append(text)
        return False

    def _record_reset(self, result: Any) -> bool:
        possible = list(self.env.possible_agents)
        if not isinstance(result, tuple) or len(result) != 2 or not all(isinstance(part, dict) for part in result):
            return self._problem(TYPES, f"reset() must return ({{agent: messages}}, {{agent: info}}), got {describe_shape(result)}")
        observations, infos = result
        for agent in possible:
            problem = reset_problem((observations.get(agent, []), infos.get(agent, {})))
            if problem:
                return self._problem(TYPES, f"agent {agent!r}: {problem}")
        if not self._keys_known("reset()", observations, infos):
            return False
        self.histories = {agent: list(observations.get(agent, [])) for agent in possible}
        self.secrets = {agent: _private_views(infos.get(agent, {})) for agent in possible}
        self.live = [agent for agent in possible if agent in self.env.agents]
        self._check_isolation("reset()", observations)
        self.trace.append(canonical([observations, infos, self.env.agent_selection]))
        return self._check_selection("after reset()")

    def _record_step(self, agent: str, action: Message, result: Any) -> bool:
        self.steps += 1
        where = f"step() #{self.steps} by {agent!r}"
        problem = _step_problem(result, self.live)
        if problem:
            return self._problem(TYPES, f"{where}: {problem}")
        observations, rewards, terminations, truncations, infos = result
        if not self._keys_known(where, observations, rewards, terminations, truncations, infos):
            return False
        for who, messages in observations.items():
            self.histories[who].extend(messages)
        self._check_isolation(where, observations)
        self.trace.append(canonical([observations, rewards, terminations, truncations, infos, self.env.agent_selection]))
        self.live = [a for a in self.live if not (terminations[a] or truncations[a])]
        if not self.live:
            self.ended = True
            if self.env.agents:
                return self._problem(ORDER, f"{where}: every agent is done but env.agents is still {self.env.agents}")
            return False
        return self._check_selection(f"after {where}")

    # -- individual checks ---------------------------------------------------------------------
    def _keys_known(self, where: str, *dicts: dict[str, Any]) -> bool:
        possible = set(self.env.possible_agents)
        for d in dicts:
            unknown = sorted(set(d) - possible)
            if unknown:
                return self._problem(TYPES, f"{where} names agents {unknown} that are not in possible_agents {sorted(possible)}")
        return True

    def _check_selection(self, where: str) -> bool:
        selected, agents = self.env.agent_selection, list(self.env.agents)
        if selected not in agents:
            return self._problem(ORDER, f"{where}: agent_selection {selected!r} is not in env.agents {agents}")
        if selected not in self.live:
            return self._problem(ORDER, f"{where}: agent_selection {selected!r} already terminated or truncated")
        if set(agents) - set(self.live):
            return self._problem(ORDER, f"{where}: env.agents {agents} still lists finished agents")
        return True

    def _check_isolation(self, where: str, observations: dict[str, list[Message]]) -> None:
        seen: dict[int, str] = {}
        for agent, messages in observations.items():
            for message in messages:
                owner = seen.setdefault(id(message), agent)
                if owner != agent:
                    self._problem(
                        ISOLATION, f"{where}: {owner!r} and {agent!r} receive the same message object; give each agent its own copy"
                    )
            text = canonical(messages)
            own = set(self.secrets.get(agent, []))
            for other, secrets in self.secrets.items():
                leaked = [s for s in secrets if other != agent and s not in own and s in text]
                if leaked:
                    self._problem(ISOLATION, f"{where}: {agent!r} sees {other!r}'s private text {leaked[0]!r}")


def _private_views(info: dict[str, Any]) -> list[str]:
    view = info.get("private_view") or []
    return [view] if isinstance(view, str) else [str(v) for v in view]


def _step_problem(result: Any, live: list[str]) -> str | None:
    if not isinstance(result, tuple) or len(result) != 5:
        return f"must return (observations, rewards, terminations, truncations, infos), got {describe_shape(result)}"
    names = ("observations", "rewards", "terminations", "truncations", "infos")
    for name, part in zip(names, result):
        if not isinstance(part, dict):
            return f"{name} must be a dict keyed by agent, got {type(part).__name__}"
    observations, rewards, terminations, truncations, infos = result
    for agent, reward in rewards.items():
        if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
            return f"rewards[{agent!r}] must be a number, got {type(reward).__name__}"
    for name, flags in (("terminations", terminations), ("truncations", truncations)):
        missing = [a for a in live if a not in flags]
        if missing:
            return f"{name} must name every live agent; missing {missing}"
        wrong = [a for a, flag in flags.items() if not isinstance(flag, bool)]
        if wrong:
            return f"{name}[{wrong[0]!r}] must be bool, got {type(flags[wrong[0]]).__name__}"
    for agent, messages in observations.items():
        problem = message_problem(messages, f"observations[{agent!r}]")
        if problem:
            return problem
    for agent, info in infos.items():
        if not isinstance(info, dict):
            return f"infos[{agent!r}] must be a dict, got {type(info).__name__}"
        components = info.get("reward_components")
        if components is not None and not (isinstance(components, dict) and all(isinstance(v, numbers.Real) for v in components.values())):
            return f'infos[{agent!r}]["reward_components"] must map names to numbers'
    return None


def check_multi_agent_env(
    env: MultiAgentEnv,
    *,
    seed: int = 0,
    raise_on_failure: bool = True,
    name: str | None = None,
    policy: MultiPolicy | None = None,
    max_steps: int | None = None,
) -> CheckReport:
    """Check ``env`` against the multi-agent contract; raise ``EnvCheckError`` (or return the report)."""
    spec = getattr(env, "spec", None)
    report = CheckReport(name or (spec.id if spec is not None else type(env).__name__))
    possible = getattr(env, "possible_agents", None)
    if not isinstance(env, MultiAgentEnv):
        report.add("is a MultiAgentEnv", False, f"{type(env).__name__} does not subclass miles_envs.MultiAgentEnv")
        return finish_report(report, raise_on_failure)
    if not possible or len(set(possible)) != len(possible) or not all(isinstance(a, str) for a in possible):
        report.add("is a MultiAgentEnv", False, f"possible_agents must be a non-empty list of distinct strings, got {possible!r}")
        return finish_report(report, raise_on_failure)
    report.add("is a MultiAgentEnv", True)
    policy = policy or probe_policy
    cap = max_steps or env.max_turns or DEFAULT_STEP_CAP * len(possible)

    first = guarded(report, TYPES, lambda: _MultiEpisode(env, policy, cap).run_sync(seed))
    if first is not None:
        for check in (TYPES, ORDER, ISOLATION):
            report.add(check, not first.problems[check], "; ".join(first.problems[check]))
        if not first.problems[TYPES]:
            limit = f"max_turns={env.max_turns}" if env.max_turns else f"{cap} steps (max_turns unset)"
            report.add(
                "terminates within max_turns", first.ended,
                "" if first.ended else f"agents {first.live} still live after {limit} under the probe policy",
            )
            check_replays(
                report, first.trace,
                lambda: _MultiEpisode(env, policy, cap).run_sync(seed),
                lambda: _MultiEpisode(env, policy, cap).run_async(seed),
            )
    check_close(report, env)
    return finish_report(report, raise_on_failure)
