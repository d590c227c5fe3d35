"""The env loop: drives an Engine through many envs at once, producing token-exact Trajectories.

Per turn: generate from the current token stream → append the engine's ids, logprobs and routing
rows as-is → parse the action → ``env.astep`` → render the observation as a token delta → repeat.
The token stream is never re-tokenized. Failure taxonomy: an env exception gives ``failed`` with the
traceback; an engine abort, timeout or transport error gives ``aborted``; a length stop or the
context/turn limit gives ``truncated``. One bad episode never stops the batch.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from miles_envs.deadlines import DeadlineExceeded, within
from miles_envs.engine import Engine, Generation, SamplingParams
from miles_envs.env import Env, Message
from miles_envs.pacing import LagWindow, quiet_collector
from miles_envs.parsers import ToolParseError
from miles_envs.session import as_session
from miles_envs.token_ids import TokenIds
from miles_envs.trajectory import Status, Trajectory, Turn, expert_dtype

EnvFactory = Callable[[], Env]
T = TypeVar("T")
E = TypeVar("E", bound=Env)
NON_APPEND_ONLY = "non_append_only_template"
STARTS_PER_PASS = 256


@dataclass
class LoopConfig:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_turns: int | None = None
    max_context: int = 32768
    return_routed_experts: bool = False
    lora: str | None = None
    env_timeout: float | None = 60.0
    # "truncate": a length stop ends the episode; "continue": the env still sees the cut-off reply.
    on_length: str = "truncate"
    # Client CPU work (env steps, rendering) in flight is bounded so the event loop's lag stays near
    # this (None: unbounded), and the collector's full passes are kept out of the rollout
    # (``pacing.QuietCollector``). Generation requests are bounded by the engine's capacity instead.
    max_loop_lag: float | None = 0.01
    # An aborted episode (engine trouble, never the env's) is replayed up to this many times with the same seeds.
    retries: int = 2

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries={self.retries}: must be 0 or more")


class TokenStream:
    """One agent's growing token stream: ids, mask, logprobs, turn spans and routing rows (reused by the multi-agent loop)."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.tokens = TokenIds(prompt_ids)  # only grows: engines may reuse work on its prefix
        self.trajectory = Trajectory(prompt_ids=list(prompt_ids))
        self.routing: list[np.ndarray] = []
        self.rows_held = 0

    def append(self, ids: list[int], kind: str, logprobs: list[float] | None = None, **turn: Any) -> None:
        t = self.trajectory
        start = len(t.response_ids)
        t.response_ids.extend(ids)
        t.loss_mask.extend([1 if kind == "model" else 0] * len(ids))
        t.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        t.turns.append(Turn(kind=kind, start=start, end=start + len(ids), **turn))
        self.tokens.extend(ids)

    def add_routing(self, rows: np.ndarray | None) -> None:
        if rows is not None and len(rows):
            self.routing.append(rows)
            self.rows_held += len(rows)

    def finish_routing(self) -> None:
        """Concatenate once at the end: per-turn appends stay O(new tokens)."""
        if not self.routing:
            return
        rows = np.concatenate(self.routing)
        if len(rows) != len(self.tokens) - 1:
            self.trajectory.flags.append("routing_incomplete")
            return
        self.trajectory.routed_experts = rows.astype(expert_dtype(int(rows.max()) + 1))


async def run_episode(
    env: Env,
    engine: Engine,
    renderer: Any,
    parser: Any,
    config: LoopConfig,
    *,
    seed: int | None = None,
    sampling_seed: int | None = None,
    ids: dict[str, Any] | None = None,
    admission: AbstractAsyncContextManager[Any] | None = None,
) -> Trajectory:
    """Play one episode; never raises for env or engine trouble (it is recorded in the status).

    ``admission`` is entered around the client's CPU work (the reset, and each turn's parsing, env
    step and rendering; ``rollout`` passes its ``LagWindow``), never across the engine call: how
    many generations run at once is the engine's capacity (see ``miles_envs.session``).
    """
    admission = admission or nullcontext()
    episode: TokenStream | None = None
    messages: list[Message] = []
    stats = {"tool_calls": 0, "parse_errors": 0, "generate_s": 0.0, "env_s": 0.0}
    status, error, reward, components = Status.COMPLETED, None, 0.0, {}
    try:
        async with admission:
            started = time.perf_counter()
            timeout = None if env.run_inline else config.env_timeout  # an inline env cannot be interrupted
            obs, info = await with_timeout(env.areset(seed=seed), timeout, "reset")
            stats["env_s"] += time.perf_counter() - started
            tools = info.get("tools")
            messages.extend(obs)
            episode = TokenStream(renderer.prompt_ids(messages, tools=tools))
            stop_ids = sorted(set(config.sampling.stop_token_ids) | set(renderer.stop_token_ids))
            episode_sampling = replace(
                config.sampling, stop_token_ids=stop_ids,
                seed=sampling_seed if sampling_seed is not None else config.sampling.seed,
            )
            max_turns = config.max_turns or env.max_turns
            turns = 0
        while True:
            budget = config.max_context - len(episode.tokens)
            if budget <= 0:
                status, error = Status.TRUNCATED, f"context limit {config.max_context} reached"
                break
            request_seed = turn_seed(episode_sampling.seed, turns)
            sampling = (episode_sampling if request_seed == episode_sampling.seed
                        else replace(episode_sampling, seed=request_seed))
            if budget < sampling.max_new_tokens:  # the reply may not run past the context
                sampling = replace(sampling, max_new_tokens=budget)
            started = time.perf_counter()
            try:  # no admission slot is held across the engine call: the engine bounds its own requests
                gen = await engine.generate(
                    episode.tokens, sampling, return_routed_experts=config.return_routed_experts,
                    routed_experts_start=episode.rows_held, lora=config.lora,
                )
            except Exception as exc:  # transport trouble is the engine's failure, not the env's
                status, error = Status.ABORTED, f"engine error: {type(exc).__name__}: {exc}"
                break
            stats["generate_s"] += time.perf_counter() - started
            turns += 1
            async with admission:
                episode.add_routing(gen.routed_experts)
                append_generation(episode, gen)
                if gen.finish_reason == "abort":
                    status, error = Status.ABORTED, gen.error or "engine aborted the request"
                    break
                if gen.finish_reason == "length" and config.on_length == "truncate":
                    messages.append({"role": "assistant", "content": reply_text(renderer, gen.output_ids)})
                    status = Status.TRUNCATED
                    break
                history = list(messages)
                turn_message, action, parsed_cleanly = parse_turn(parser, reply_text(renderer, gen.output_ids))
                stats["tool_calls"] += len(action.get("tool_calls") or [])
                stats["parse_errors"] += not parsed_cleanly
                messages.append(turn_message)
                started = time.perf_counter()
                try:
                    obs, step_reward, terminated, truncated, info = await with_timeout(env.astep(action), timeout, "step")
                finally:
                    stats["env_s"] += time.perf_counter() - started
                reward += float(step_reward)
                components = info.get("reward_components", components)
                messages.extend(obs)
                if terminated or truncated:
                    status = Status.COMPLETED if terminated else Status.TRUNCATED
                    break
                if max_turns is not None and turns >= max_turns:
                    status = Status.TRUNCATED  # the stream ends on the model's turn: nothing after it is trained on
                    break
                delta = renderer.delta_ids(history, turn_message, gen.output_ids, gen.finish_reason, obs, tools=tools)
                if not delta.append_only and NON_APPEND_ONLY not in episode.trajectory.flags:
                    episode.trajectory.flags.append(NON_APPEND_ONLY)
                if len(episode.tokens) + len(delta.ids) >= config.max_context:
                    status, error = Status.TRUNCATED, f"context limit {config.max_context} reached"
                    break
                episode.append(delta.ids, "env")
    except Exception as exc:
        status = Status.FAILED
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    trajectory = episode.trajectory if episode is not None else Trajectory(prompt_ids=[])
    if episode is not None:
        episode.finish_routing()
    trajectory.messages = messages
    trajectory.reward, trajectory.reward_components = reward, dict(components)
    trajectory.status, trajectory.error, trajectory.seed = status, error, seed
    trajectory.metadata.update(stats)
    for key, value in (ids or {}).items():
        setattr(trajectory, key, value)
    return trajectory


def parse_turn(parser: Any, text: str) -> tuple[Message, Message, bool]:
    """Reply text → (message for the history, action for the env, parsed cleanly).

    A malformed tool call keeps the raw text and tells the env through ``parse_error``.
    """
    try:
        parsed = parser.parse(text)
    except ToolParseError as exc:
        turn_message: Message = {"role": "assistant", "content": text}
        return turn_message, {**turn_message, "tool_calls": [], "parse_error": str(exc)}, False
    message = parsed.as_message()
    return message, message, True


def reply_text(renderer: Any, output_ids: list[int]) -> str:
    """The reply as the parser and the chat history see it: without the end-of-turn token."""
    return renderer.turn_text(output_ids)


def append_generation(episode: TokenStream, gen: Generation) -> None:
    """The engine's ids as-is; a generation that crossed weight updates keeps its version spans."""
    spec = gen.spec
    start = len(episode.trajectory.response_ids)
    episode.append(
        gen.output_ids, "model", gen.logprobs,  # copied by the stream's extends
        finish_reason=gen.finish_reason, weight_version=gen.weight_version,
        version_spans=[(start + index, version) for index, version in gen.version_spans],
        spec_verify_ct=spec.verify_ct if spec else 0,
        spec_accepted_tokens=spec.accepted_tokens if spec else 0,
        spec_draft_tokens=spec.draft_tokens if spec else 0,
    )


async def with_timeout(awaitable, timeout: float | None, what: str):
    """``awaitable`` under the env deadline, in the calling task; a TimeoutError the env raises itself passes as is."""
    try:
        return await within(awaitable, timeout)
    except DeadlineExceeded:
        raise TimeoutError(_env_timeout(what, timeout)) from None


def _env_timeout(what: str, timeout: float) -> str:
    return f"env {what}() did not finish within {timeout}s (LoopConfig.env_timeout)"


def turn_seed(episode_seed: int | None, turn: int) -> int | None:
    """The sampling seed of an episode's ``turn``.

    An engine restarts a request's random stream from its seed, so one seed for every turn would
    draw each turn's first tokens from the same numbers. Turn 0 keeps the episode's seed (a
    one-turn rollout is unchanged); later turns get an independent one from numpy's
    ``SeedSequence`` of (episode seed, turn), 63 bits as torch and SGLang take it.
    """
    if episode_seed is None or turn == 0:
        return episode_seed
    return int(np.random.SeedSequence((episode_seed, turn)).generate_state(1, np.uint64)[0]) >> 1


def episode_key(task_index: int, member: int) -> str:
    return f"{task_index}:{member}"


def episode_order(trajectory: Trajectory) -> tuple[int, int]:
    """``(task, member)`` of a trajectory ``rollout`` played: its place in the grid, whatever the finish order."""
    task, member = str(trajectory.episode_id).split(":")
    return int(task), int(member)


async def rollout(
    envs: str | EnvFactory,
    engine: Engine,
    renderer: Any,
    *,
    parser: Any = None,
    n: int = 1,
    group_size: int = 1,
    config: LoopConfig | None = None,
    concurrency: int = 256,
    seed: int = 0,
    skip: Collection[str] = (),
) -> AsyncIterator[Trajectory]:
    """Run ``n`` tasks × ``group_size`` episodes, yielding Trajectories as they finish.

    Task ``i`` uses env seed ``seed + i``; its ``group_size`` episodes share that seed and a group
    id, and differ by sampling seed. ``skip`` holds ``episode_key(i, j)`` values already done (resume).
    An aborted episode is replayed (same env and sampling seeds) up to ``config.retries`` times; only
    its last attempt is yielded, with the earlier abort reasons in ``metadata["retried_aborts"]``.
    ``engine`` may be a ``RolloutSession`` (to update weights mid-rollout under its policy); a plain
    engine gets a default session (policy ``continue``, admission by ``engine.capacity()``).
    """
    from miles_envs.parsers import parser_for

    config = config or LoopConfig()
    parser = parser or parser_for(renderer.tokenizer)
    factory, env_id = env_factory(envs)
    session = as_session(engine)
    admission = LagWindow(config.max_loop_lag) if config.max_loop_lag else None

    async def attempt(env_seed: int, sampling_seed: int | None, ids: dict[str, Any]) -> Trajectory:
        env, error = make_env(factory)
        if env is None:
            return Trajectory(prompt_ids=[], status=Status.FAILED, error=error, seed=env_seed, **ids)
        try:
            return await run_episode(
                env, session, renderer, parser, config, seed=env_seed, sampling_seed=sampling_seed, ids=ids,
                admission=admission,
            )
        finally:
            await env.aclose()

    async def one(task: int, member: int) -> Trajectory:
        env_seed = seed + task
        ids = {"env_id": env_id, "group_id": f"{env_id}#{env_seed}", "episode_id": episode_key(task, member)}
        sampling_seed = None if config.sampling.seed is None else config.sampling.seed + task * group_size + member
        aborts: list[str | None] = []
        while True:
            trajectory = await attempt(env_seed, sampling_seed, ids)
            if trajectory.status is not Status.ABORTED or len(aborts) >= config.retries:
                break
            aborts.append(trajectory.error)
        if aborts:
            trajectory.metadata["retried_aborts"] = aborts
        return trajectory

    try:
        with quiet_collector if config.max_loop_lag else nullcontext():
            async for trajectory in run_grid(one, n, group_size, concurrency, skip):
                yield trajectory
    finally:
        if admission is not None:
            admission.close()


async def run_grid(
    play: Callable[[int, int], Awaitable[T]], n: int, group_size: int, concurrency: int, skip: Collection[str] = ()
) -> AsyncIterator[T]:
    """``play(task, member)`` for every cell of the ``n`` × ``group_size`` grid not in ``skip``, at most
    ``concurrency`` at once, yielding results as they finish (the rest are cancelled if the caller stops).

    Cells are started lazily in grid order, so memory is bounded by ``concurrency``, not by the grid,
    and at most ``STARTS_PER_PASS`` per event-loop pass: ten thousand first steps in one pass would
    stall the loop for a quarter of a second.
    """
    cells = ((t, m) for t in range(n) for m in range(group_size) if episode_key(t, m) not in skip)
    finished: asyncio.Queue[asyncio.Future[T]] = asyncio.Queue()
    running: set[asyncio.Future[T]] = set()
    loop = asyncio.get_running_loop()
    more: asyncio.Handle | None = None

    def on_done(future: asyncio.Future[T]) -> None:
        running.discard(future)
        finished.put_nowait(future)

    def top_up() -> None:
        nonlocal more
        more = None
        for _ in range(STARTS_PER_PASS):
            if len(running) >= concurrency or (cell := next(cells, None)) is None:
                return
            future = asyncio.ensure_future(play(*cell))
            running.add(future)
            future.add_done_callback(on_done)
        if more is None and len(running) < concurrency:
            more = loop.call_soon(top_up)  # the rest next pass, after what is ready now

    try:
        top_up()
        while running or not finished.empty():
            future = await finished.get()
            if more is None:
                top_up()
            yield future.result()
    finally:
        if more is not None:
            more.cancel()
        for future in list(running):
            future.cancel()


def make_env(factory: Callable[[], E]) -> tuple[E | None, str | None]:
    """A fresh env, or None and the traceback: a broken task fails its episode, not the batch."""
    try:
        return factory(), None
    except Exception as exc:
        return None, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def env_factory(envs: str | EnvFactory) -> tuple[EnvFactory, str | None]:
    if isinstance(envs, str):
        from miles_envs.registry import spec

        env_spec = spec(envs)  # unknown ids fail here, before any episode starts
        return env_spec.make, env_spec.id
    return envs, getattr(envs, "__name__", None)
