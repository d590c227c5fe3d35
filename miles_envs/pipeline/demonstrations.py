"""Demonstration episodes for a supervised warm start, played through the real env loop.

An env may define ``demonstration(history) -> assistant message``: the reply a good policy would
give after the conversation ``history``. :func:`collect_demonstrations` plays episodes through the
env loop with a scripted engine that answers with those replies, so the token stream (prompt,
reply ids, end-of-turn token, observation deltas, loss mask) is exactly what an RL rollout of the
same conversation would produce; :func:`miles_envs.trainer.sft.warm_start` trains on them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from miles_envs.agents.scripted import ScriptContext, ScriptedEngine
from miles_envs.engine import SamplingParams
from miles_envs.env import Env, Message
from miles_envs.loop import LoopConfig, run_episode
from miles_envs.parsers import parser_for
from miles_envs.registry import make
from miles_envs.trajectory import Status, Trajectory


class NoDemonstrationError(ValueError):
    """The env has no ``demonstration(history)`` method, so there is nothing to warm-start on."""


class _Demonstrator(Env):
    """Wraps an env, keeps the conversation, and answers every turn with the env's demonstration."""

    def __init__(self, env: Env) -> None:
        if not callable(getattr(env, "demonstration", None)):
            raise NoDemonstrationError(
                f"{type(env).__name__} defines no demonstration(history) method: add one that returns the "
                "assistant message a good policy would send, or train without a warm start"
            )
        self.env = env
        self.max_turns = env.max_turns
        self.history: list[Message] = []

    async def areset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = await self.env.areset(seed=seed, options=options)
        self.history = list(observation)
        return observation, info

    async def astep(self, action: Message):
        self.history.append(action)
        result = await self.env.astep(action)
        self.history.extend(result[0])
        return result

    async def aclose(self) -> None:
        await self.env.aclose()

    def reply(self, _context: ScriptContext) -> str:
        message = self.env.demonstration(list(self.history))
        if message.get("tool_calls"):
            raise NotImplementedError(
                f"{type(self.env).__name__}.demonstration returned tool_calls; warm starts take text replies only"
            )
        return message.get("content") or ""


async def collect_demonstrations(
    env_id: str,
    renderer: Any,
    seeds: Sequence[int],
    *,
    parser: Any = None,
    max_new_tokens: int = 512,
    max_context: int = 32768,
) -> list[Trajectory]:
    """One demonstration episode per seed, as the env loop tokenises it; failed episodes raise."""
    parser = parser or parser_for(renderer.tokenizer)
    end_of_turn = renderer.turn_end_id if renderer.turn_end_id is not None else renderer.stop_token_ids[0]
    config = LoopConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), max_context=max_context)

    async def one(seed: int) -> Trajectory:
        teacher = _Demonstrator(make(env_id))
        engine = ScriptedEngine(renderer.tokenizer, teacher.reply, eos_token_id=end_of_turn)
        try:
            trajectory = await run_episode(teacher, engine, renderer, parser, config, seed=seed, ids={"env_id": env_id})
        finally:
            await teacher.aclose()
        if trajectory.status in (Status.FAILED, Status.ABORTED):
            raise RuntimeError(f"demonstration episode of {env_id} (seed {seed}) {trajectory.status.value}: {trajectory.error}")
        return trajectory

    return list(await asyncio.gather(*(one(seed) for seed in seeds)))
