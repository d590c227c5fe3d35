"""Asynchronous training: rollouts keep running while the trainer trains, within a staleness bound.

Two activities share one event loop:

- **Producers** play groups (``group_size`` episodes of one task) and stream each finished
  trajectory into a :class:`~miles_envs.pipeline.buffer.RolloutBuffer`. A new group may start while
  ``consumed + outstanding < (pushed + max_staleness + 1) * tasks_per_step + surplus``, where
  ``consumed`` counts groups trained on in this run, ``outstanding`` the groups started and not yet
  trained on or dropped, ``pushed`` the weight versions pushed in this run, and ``surplus =
  ceil((oversample - 1) * tasks_per_step)`` the over-sampling margin. So rollout runs at most
  ``max_staleness`` versions ahead of the trainer and never otherwise waits for it; with
  ``max_staleness=0`` the schedule is synchronous. ``max_buffer_tokens`` adds back-pressure: no new
  group starts while that many tokens wait in the buffer (groups already running always finish, so
  a buffer full of half-done groups cannot deadlock).
- **The trainer** takes ``tasks_per_step`` complete groups (waiting only when too few are ready),
  trains on them in a worker thread (so rollouts keep streaming), pushes the weights through the
  run's :class:`~miles_envs.pipeline.weights.WeightSync` (``version="step-N"``) while generations
  are in flight, and writes the step's record and, when due, a checkpoint holding the buffer's
  position.

A group whose oldest token is more than ``max_staleness`` versions behind the trainer is never
trained on: it is dropped, or with ``on_stale="resample"`` played again (same task, fresh
weights; dropping alone would bias training towards short episodes). Per-step metrics: the
staleness histograms (``staleness/*``), dropped/resampled counts and buffer depth (``buffer/*``),
and how busy rollout and trainer were (``time/*``); the trained group numbers are in ``groups``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from miles_envs.loop import LoopConfig, rollout
from miles_envs.pipeline.buffer import STALE_POLICIES, Group, GroupPosition, RolloutBuffer
from miles_envs.pipeline.records import RunFolder, rollout_metrics
from miles_envs.pipeline.staleness import staleness_metrics
from miles_envs.pipeline.sync import rollout_config
from miles_envs.pipeline.weights import InProcess, WeightSync
from miles_envs.trajectory import Trajectory

# (group number, group size, loop config, env seed) -> that group's trajectories as they finish
GroupRunner = Callable[[int, int, LoopConfig, int], AsyncIterator[Trajectory]]


@dataclass(frozen=True)
class AsyncSettings:
    max_staleness: int = 1
    on_stale: str = "drop"  # drop | resample
    oversample: float = 1.0  # >1 keeps extra groups running beyond what the bound needs
    max_buffer_tokens: int | None = None  # back-pressure: no new group while this many tokens wait

    def validate(self) -> AsyncSettings:
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(
                f"max_staleness={self.max_staleness!r}: give a whole number of versions >= 0 "
                "(0 trains only on the newest weights' rollouts; 1-4 is the usual range)"
            )
        if self.on_stale not in STALE_POLICIES:
            raise ValueError(f"on_stale={self.on_stale!r}: choose one of {', '.join(STALE_POLICIES)}")
        if not self.oversample >= 1.0:
            raise ValueError(f"oversample={self.oversample}: must be >= 1 (1 starts only the groups the bound allows)")
        if self.max_buffer_tokens is not None and self.max_buffer_tokens < 1:
            raise ValueError(f"max_buffer_tokens={self.max_buffer_tokens}: must be >= 1, or None for no bound")
        return self


class LiveUpdateUnsupported(ValueError):
    """The engine cannot take weights while it generates, which asynchronous training needs."""


def check_live_updates(engine: Any) -> None:
    """Refuse an engine that cannot take ``update_weights(source, version=...)`` mid-generation.

    An engine (or wrapper) declares that it cannot with ``live_weight_updates = False``, and says
    why in ``live_weight_updates_reason``.
    """
    update = getattr(engine, "update_weights", None)
    takes_version = update is not None and "version" in inspect.signature(update).parameters
    if getattr(engine, "live_weight_updates", True) is False or not takes_version:
        reason = getattr(engine, "live_weight_updates_reason", None) or (
            f"{type(engine).__name__}.update_weights does not take version=..., so the rollouts' tokens cannot be "
            "labelled with the weights that sampled them"
        )
        raise LiveUpdateUnsupported(f"asynchronous training pushes weights while episodes run, but {reason}; train without --async")


def local_group_runner(env_id: Any, engine: Any, renderer: Any, parser: Any = None) -> GroupRunner:
    """Groups played in this process through ``miles_envs.loop.rollout``."""

    def run(index: int, group_size: int, config: LoopConfig, env_seed: int) -> AsyncIterator[Trajectory]:
        return rollout(env_id, engine, renderer, parser=parser, n=1, group_size=group_size, config=config, seed=env_seed)

    return run


class BusyClock:
    """Time during which at least one holder is active, read as a fraction since the last read."""

    def __init__(self) -> None:
        self.active = 0
        self.busy = 0.0
        self._since = self._read_at = time.perf_counter()

    def _tick(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.active:
            self.busy += now - self._since
        self._since = now

    def enter(self) -> None:
        self._tick()
        self.active += 1

    def exit(self) -> None:
        self._tick()
        self.active -= 1

    def fraction(self) -> float:
        now = time.perf_counter()
        self._tick(now)
        elapsed, busy = now - self._read_at, self.busy
        self._read_at, self.busy = now, 0.0
        return busy / elapsed if elapsed > 0 else 0.0


class AsyncRun:
    """One asynchronous training run; see the module docstring for the schedule."""

    def __init__(
        self,
        weight_sync: WeightSync,
        trainer: Any,
        run_group: GroupRunner,
        *,
        tasks_per_step: int,
        group_size: int,
        loop_config: LoopConfig,
        seed: int,
        settings: AsyncSettings,
        position: GroupPosition,
    ) -> None:
        self.weight_sync, self.trainer, self.run_group = weight_sync, trainer, run_group
        self.tasks_per_step, self.group_size = tasks_per_step, group_size
        self.loop_config, self.seed, self.settings = loop_config, seed, settings
        self.position = position
        self.replay: deque[int] = deque(position.unsettled())  # in flight or buffered when the run stopped
        self.buffer = RolloutBuffer(group_size, max_staleness=settings.max_staleness)
        self.surplus = math.ceil((settings.oversample - 1.0) * tasks_per_step)
        self.consumed = self.outstanding = self.pushed = 0
        self.dropped_groups = self.dropped_trajectories = self.resampled_groups = 0
        self.running: dict[int, asyncio.Task] = {}
        self.rollout_clock, self.trainer_clock = BusyClock(), BusyClock()
        self._wake = asyncio.Event()
        self._failure: asyncio.Future = asyncio.get_running_loop().create_future()

    # -- producers -------------------------------------------------------------------------------
    def may_start(self) -> bool:
        window = (self.pushed + self.settings.max_staleness + 1) * self.tasks_per_step + self.surplus
        if self.consumed + self.outstanding >= window:
            return False
        bound = self.settings.max_buffer_tokens
        return bound is None or self.buffer.tokens < bound

    async def produce(self) -> None:
        while True:
            while not self.may_start():
                self._wake.clear()
                await self._wake.wait()
            index = self.replay.popleft() if self.replay else self.position.issue()
            self.outstanding += 1
            self.running[index] = asyncio.create_task(self.play(index))

    def group_config(self, index: int) -> LoopConfig:
        sampling = self.loop_config.sampling
        if sampling.seed is not None:  # member m of group i samples with seed + i * group_size + m
            sampling = replace(sampling, seed=sampling.seed + index * self.group_size)
        return replace(self.loop_config, sampling=sampling)

    async def play(self, index: int) -> None:
        self.rollout_clock.enter()
        try:
            async for trajectory in self.run_group(index, self.group_size, self.group_config(index), self.seed + index):
                trajectory.metadata["group_index"] = index
                self.buffer.add(index, trajectory)
        except asyncio.CancelledError:
            self.buffer.discard(index)
            raise
        except Exception as exc:  # a broken runner (not a failed episode: those are trajectories)
            if not self._failure.done():
                self._failure.set_exception(exc)
        finally:
            self.rollout_clock.exit()
            self.running.pop(index, None)
            self._wake.set()

    def on_stale(self, groups: list[Group]) -> None:
        for group in groups:
            self.outstanding -= 1
            self.dropped_groups += 1
            self.dropped_trajectories += len(group.trajectories)
            if self.settings.on_stale == "resample":
                self.resampled_groups += 1
                self.replay.appendleft(group.index)
            else:
                self.position.settle(group.index)
        self._wake.set()

    # -- the trainer -----------------------------------------------------------------------------
    async def take(self, version: int):
        waiting = asyncio.ensure_future(self.buffer.take(self.tasks_per_step, version, self.on_stale))
        done, _ = await asyncio.wait({waiting, self._failure}, return_when=asyncio.FIRST_COMPLETED)
        if self._failure in done:
            waiting.cancel()
            raise RuntimeError(f"a rollout group failed outside any episode: {self._failure.exception()}") from self._failure.exception()
        return waiting.result()

    async def step(self) -> dict[str, Any]:
        """Take the step's groups, train, push the weights; returns the step's metrics."""
        trainer = self.trainer
        version = trainer.step
        before = (self.dropped_groups, self.dropped_trajectories, self.resampled_groups)
        started = time.perf_counter()
        taken = await self.take(version)
        waited = time.perf_counter() - started
        for group in taken.groups:
            self.position.settle(group.index)
        self.outstanding -= len(taken.groups)
        self.consumed += len(taken.groups)
        self._wake.set()
        trajectories = taken.trajectories
        self.trainer_clock.enter()
        try:
            metrics = await asyncio.to_thread(trainer.train_step, trajectories)
            await self.weight_sync.push(trainer)
        finally:
            self.trainer_clock.exit()
        self.pushed += 1
        self._wake.set()
        dropped_groups, dropped_trajectories, resampled = before
        return {
            **metrics,
            **rollout_metrics(trajectories),
            **staleness_metrics(trajectories, version),
            "buffer/dropped_groups": float(self.dropped_groups - dropped_groups),
            "buffer/dropped_trajectories": float(self.dropped_trajectories - dropped_trajectories),
            "buffer/resampled_groups": float(self.resampled_groups - resampled),
            "buffer/dropped_groups_total": float(self.dropped_groups),
            "buffer/ready_groups": float(self.buffer.ready_groups),
            "buffer/partial_groups": float(self.buffer.partial_groups),
            "buffer/tokens": float(self.buffer.tokens),
            "buffer/running_groups": float(len(self.running)),
            "time/trainer_wait_s": waited,
            "time/rollout_busy_frac": self.rollout_clock.fraction(),
            "time/trainer_busy_frac": self.trainer_clock.fraction(),
            "groups": sorted(g.index for g in taken.groups),
        }

    async def stop(self) -> None:
        """Cancel the groups still running; they stay unsettled, so a resume plays them again."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def train_async(
    env_id: Any,
    engine: Any,
    trainer: Any,
    steps: int,
    *,
    renderer: Any = None,
    parser: Any = None,
    tasks_per_step: int = 8,
    group_size: int = 4,
    loop_config: LoopConfig | None = None,
    settings: AsyncSettings = AsyncSettings(),
    out_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    keep_checkpoints: int = 2,
    seed: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    after_step: Callable[[int], Awaitable[None]] | None = None,
    run_group: GroupRunner | None = None,
    weight_sync: WeightSync | None = None,
) -> list[dict[str, Any]]:
    """Train for ``steps`` steps in total (counting resumed ones) with rollouts running alongside.

    Group ``i`` plays env seed ``seed + i`` (the tasks a synchronous run plays, in order);
    ``run_group`` replaces the in-process rollout (e.g. Ray workers). ``after_step(step)`` runs
    after each step's weight push and record (an eval, say) while rollouts continue.
    ``weight_sync`` says how weights reach the engines (default: the trainer's tensors to ``engine``).
    """
    settings.validate()
    check_live_updates(engine)
    config = rollout_config(loop_config, trainer)
    sync = weight_sync or InProcess(engine)
    folder = state = None
    if out_dir is not None:
        folder = RunFolder(out_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
        state = folder.resume(trainer)
    first = trainer.step * tasks_per_step  # a run resumed from a synchronous checkpoint starts after its tasks
    position = GroupPosition.from_dict(state["groups"]) if state and "groups" in state else GroupPosition(first, first)
    history: list[dict[str, Any]] = []
    if trainer.step >= steps:
        return history
    await sync.push(trainer)
    run = AsyncRun(
        sync, trainer, run_group or local_group_runner(env_id, engine, renderer, parser),
        tasks_per_step=tasks_per_step, group_size=group_size, loop_config=config, seed=seed, settings=settings,
        position=position,
    )
    producer = asyncio.create_task(run.produce())
    try:
        while trainer.step < steps:
            metrics = await run.step()
            history.append(metrics)
            if folder is not None:
                folder.record(trainer, metrics, steps, run_state={"groups": run.position.to_dict()})
            if on_step is not None:
                on_step(metrics)
            if after_step is not None:
                await after_step(trainer.step)
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        await run.stop()
    return history
