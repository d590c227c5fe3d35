"""The multi-agent env loop: one token stream and one Trajectory per agent, linked by an episode id.

Each agent id maps to an ``AgentPolicy`` (engine, sampling, optional LoRA adapter, ``trainable``),
so a seat can hold the learning policy itself (self-play), a frozen snapshot from an
``OpponentPool``, a ``ScriptedEngine`` or any other engine. Each agent's context holds only the
messages the env addressed to it plus its own actions: the observations that arrive while other
agents move are rendered as one token delta right before the agent's next generation, so an
agent's stream is exactly what its engine saw. The token mechanics (append generated ids as-is,
observation deltas masked out, append-only detection) are the single-agent loop's ``TokenStream``.

Failure taxonomy as in the single-agent loop, applied to every agent still playing: an env
exception fails the episode, an engine abort aborts it, the turn or context limit truncates it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from miles_envs.engine import Engine, Generation, SamplingParams
from miles_envs.env import Message, MultiAgentEnv
from miles_envs.loop import (
    NON_APPEND_ONLY,
    TokenStream,
    append_generation,
    env_factory,
    make_env,
    parse_turn,
    reply_text,
    run_grid,
    with_timeout,
    episode_key,
)
from miles_envs.multiagent.credit import role_group_id, role_of
from miles_envs.trajectory import Status, Trajectory

Matchup = Mapping[str, "AgentPolicy"]
MatchupFn = Callable[[int, int], Matchup]


@dataclass
class AgentPolicy:
    """Who plays a seat. ``renderer``/``parser`` default to the loop's (set them for an engine with another tokenizer)."""

    engine: Engine
    sampling: SamplingParams = field(default_factory=SamplingParams)
    lora: str | None = None
    trainable: bool = True
    name: str = "policy"
    renderer: Any = None
    parser: Any = None


@dataclass
class MultiLoopConfig:
    max_turns: int | None = None  # env steps per episode, all agents together; default env.max_turns
    max_context: int = 32768  # per agent
    return_routed_experts: bool = False
    env_timeout: float | None = 60.0
    # "continue": the env sees a reply cut by the length limit (a game judges it, e.g. as an illegal
    # move); "truncate": a length stop truncates the episode for everyone.
    on_length: str = "continue"


@dataclass
class MultiAgentEpisode:
    """One episode's outcome: a Trajectory per agent that took a turn, and the per-agent returns."""

    episode_id: str
    trajectories: dict[str, Trajectory]
    returns: dict[str, float]
    status: Status
    error: str | None = None
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int | None = None

    def trainable(self) -> list[Trajectory]:
        """The trajectories of seats whose policy learns (what goes to the trainer)."""
        return [t for t in self.trajectories.values() if t.metadata.get("trainable")]


class _Seat:
    """One agent's side of the episode: its messages, token stream and pending observation."""

    def __init__(self, agent: str, role: str, policy: AgentPolicy, renderer: Any, parser: Any) -> None:
        self.agent, self.role, self.policy = agent, role, policy
        self.renderer = policy.renderer or renderer
        self.parser = policy.parser or parser
        self.messages: list[Message] = []
        self.tools: list[dict[str, Any]] | None = None
        self.stream: TokenStream | None = None
        self.pending: list[Message] = []  # observation messages since this agent's last generation
        self.last_turn: tuple[list[Message], Message, Generation] | None = None
        self.reward = 0.0
        self.components: dict[str, float] = {}
        self.status: Status | None = None  # set once the agent is done
        self.stats = {"tool_calls": 0, "parse_errors": 0, "generate_s": 0.0}

    def observe(self, messages: list[Message]) -> None:
        self.messages.extend(messages)
        self.pending.extend(messages)

    def context(self, max_context: int) -> list[int] | None:
        """The ids to generate from, after rendering the pending observation; None past the limit."""
        if self.stream is None:
            self.stream = TokenStream(self.renderer.prompt_ids(self.messages, tools=self.tools))
        elif self.last_turn is not None:
            history, action, gen = self.last_turn
            delta = self.renderer.delta_ids(history, action, gen.output_ids, gen.finish_reason, self.pending, tools=self.tools)
            if not delta.append_only and NON_APPEND_ONLY not in self.stream.trajectory.flags:
                self.stream.trajectory.flags.append(NON_APPEND_ONLY)
            if len(self.stream.tokens) + len(delta.ids) >= max_context:
                return None
            self.stream.append(delta.ids, "env")
        self.pending, self.last_turn = [], None
        return None if len(self.stream.tokens) >= max_context else self.stream.tokens


async def run_multi_episode(
    env: MultiAgentEnv,
    policies: Matchup,
    renderer: Any,
    parser: Any,
    config: MultiLoopConfig,
    *,
    seed: int | None = None,
    sampling_seed: int | None = None,
    episode_id: str | None = None,
    env_id: str | None = None,
) -> MultiAgentEpisode:
    """Play one episode with ``policies[agent]`` in each seat; never raises for env or engine trouble."""
    missing = [a for a in env.possible_agents if a not in policies]
    if missing:
        raise ValueError(f"no policy for agents {missing}: pass one AgentPolicy per agent in {env.possible_agents}")
    seats = {
        agent: _Seat(agent, role_of(env, agent), policies[agent], renderer, parser) for agent in env.possible_agents
    }
    status, error, infos, env_s = Status.COMPLETED, None, {}, 0.0
    try:
        started = time.perf_counter()
        observations, reset_infos = await with_timeout(env.areset(seed=seed), config.env_timeout, "reset")
        env_s += time.perf_counter() - started
        for agent, seat in seats.items():
            seat.observe(observations.get(agent, []))
            seat.tools = reset_infos.get(agent, {}).get("tools")
        max_turns = config.max_turns or env.max_turns
        steps = 0
        while any(seat.status is None for seat in seats.values()):
            if max_turns is not None and steps >= max_turns:
                status, error = Status.TRUNCATED, f"turn limit {max_turns} reached"
                break
            agent = env.agent_selection
            seat = seats.get(agent)
            if seat is None or seat.status is not None:
                raise RuntimeError(f"env selected {agent!r}, which is not a live agent ({[a for a, s in seats.items() if s.status is None]})")
            tokens = seat.context(config.max_context)
            if tokens is None:
                status, error = Status.TRUNCATED, f"{agent}: context limit {config.max_context} reached"
                break
            gen = await _generate(seat, tokens, config, _seat_seed(seat, sampling_seed, list(seats).index(agent)))
            if isinstance(gen, str):
                status, error = Status.ABORTED, f"{agent}: {gen}"
                break
            steps += 1
            if gen.finish_reason == "length" and config.on_length == "truncate":
                seat.messages.append({"role": "assistant", "content": reply_text(seat.renderer, gen.output_ids)})
                status, error = Status.TRUNCATED, f"{agent}: reply cut by the length limit"
                break
            history = list(seat.messages)
            turn_message, action, clean = parse_turn(seat.parser, reply_text(seat.renderer, gen.output_ids))
            seat.stats["tool_calls"] += len(action.get("tool_calls") or [])
            seat.stats["parse_errors"] += not clean
            seat.messages.append(turn_message)
            seat.last_turn = (history, turn_message, gen)
            started = time.perf_counter()
            try:
                observations, rewards, terminations, truncations, infos = await with_timeout(
                    env.astep(action), config.env_timeout, "step"
                )
            finally:
                env_s += time.perf_counter() - started
            for who, messages in observations.items():
                seats[who].observe(messages)
            for who, reward in rewards.items():
                seats[who].reward += float(reward)
            for who, info in infos.items():
                seats[who].components = info.get("reward_components", seats[who].components)
            for who, other in seats.items():
                if other.status is None and (terminations.get(who) or truncations.get(who)):
                    other.status = Status.COMPLETED if terminations.get(who) else Status.TRUNCATED
    except Exception as exc:
        status = Status.FAILED
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    episode_id = episode_id or f"{env_id or type(env).__name__}#{seed}"
    trajectories = {
        agent: _trajectory(seat, seats, status, error, seed=seed, env_id=env_id, episode_id=episode_id, env_s=env_s)
        for agent, seat in seats.items()
        if seat.stream is not None and seat.stream.trajectory.num_turns
    }
    overall = status if status is not Status.COMPLETED else _overall(seats)
    return MultiAgentEpisode(
        episode_id, trajectories, {a: s.reward for a, s in seats.items()}, overall, error, dict(infos), seed
    )


def _seat_seed(seat: _Seat, sampling_seed: int | None, index: int) -> int | None:
    base = sampling_seed if sampling_seed is not None else seat.policy.sampling.seed
    return None if base is None else base + index


async def _generate(seat: _Seat, tokens: list[int], config: MultiLoopConfig, seed: int | None) -> Generation | str:
    """One generation appended to the seat's stream; a string names why the engine gave none."""
    policy = seat.policy
    budget = config.max_context - len(tokens)
    stop_ids = sorted(set(policy.sampling.stop_token_ids) | set(seat.renderer.stop_token_ids))
    sampling = replace(policy.sampling, max_new_tokens=min(policy.sampling.max_new_tokens, budget), stop_token_ids=stop_ids, seed=seed)
    started = time.perf_counter()
    try:
        gen = await policy.engine.generate(
            tokens, sampling, return_routed_experts=config.return_routed_experts,
            routed_experts_start=seat.stream.rows_held, lora=policy.lora,
        )
    except Exception as exc:  # transport trouble is the engine's failure, not the env's
        return f"engine error: {type(exc).__name__}: {exc}"
    seat.stats["generate_s"] += time.perf_counter() - started
    seat.stream.add_routing(gen.routed_experts)
    append_generation(seat.stream, gen)
    if gen.finish_reason == "abort":
        return gen.error or "engine aborted the request"
    return gen


def _overall(seats: dict[str, _Seat]) -> Status:
    statuses = {seat.status for seat in seats.values()}
    return Status.TRUNCATED if Status.TRUNCATED in statuses else Status.COMPLETED


def _trajectory(
    seat: _Seat, seats: dict[str, _Seat], status: Status, error: str | None, *, seed, env_id, episode_id, env_s
) -> Trajectory:
    seat.stream.finish_routing()
    t = seat.stream.trajectory
    t.messages = list(seat.messages)
    t.reward, t.reward_components = seat.reward, dict(seat.components)
    cut_short = status is not Status.COMPLETED and seat.status is None
    t.status = status if cut_short else (seat.status or Status.COMPLETED)
    t.error = error if cut_short else None
    t.seed, t.env_id, t.episode_id, t.agent_id = seed, env_id, episode_id, seat.agent
    t.group_id = role_group_id(env_id, seat.role, seed)
    t.metadata.update(
        seat.stats,
        env_s=env_s,
        role=seat.role,
        policy=seat.policy.name,
        trainable=seat.policy.trainable,
        opponents={a: s.policy.name for a, s in seats.items() if a != seat.agent},
    )
    return t


async def rollout_multi(
    envs: str | Callable[[], MultiAgentEnv],
    matchups: Matchup | MatchupFn,
    renderer: Any,
    *,
    parser: Any = None,
    n: int = 1,
    group_size: int = 1,
    config: MultiLoopConfig | None = None,
    concurrency: int = 64,
    seed: int = 0,
    sampling_seed: int | None = None,
) -> AsyncIterator[MultiAgentEpisode]:
    """Run ``n`` games × ``group_size`` plays each, yielding episodes as they finish.

    Game ``i`` uses env seed ``seed + i``; ``matchups`` is a fixed seating or ``(game, play) ->
    seating`` (to swap seats or draw pool opponents per episode). ``sampling_seed`` (if set) makes
    every play's sampling distinct and reproducible.
    """
    from miles_envs.parsers import parser_for

    config = config or MultiLoopConfig()
    parser = parser or parser_for(renderer.tokenizer)
    factory, env_id = env_factory(envs)

    async def one(game: int, play: int) -> MultiAgentEpisode:
        env_seed, key = seed + game, episode_key(game, play)
        env, error = make_env(factory)
        if env is None:
            return MultiAgentEpisode(key, {}, {}, Status.FAILED, error, seed=env_seed)
        try:
            seating = matchups(game, play) if callable(matchups) else matchups
            seats = len(env.possible_agents)
            play_seed = None if sampling_seed is None else sampling_seed + (game * group_size + play) * seats
            return await run_multi_episode(
                env, seating, renderer, parser, config,
                seed=env_seed, sampling_seed=play_seed, episode_id=key, env_id=env_id,
            )
        finally:
            await env.aclose()

    async for episode in run_grid(one, n, group_size, concurrency):
        yield episode
