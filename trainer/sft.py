"""Supervised warm start on an env's own demonstrations.

An env may define ``demonstration(history) -> assistant message``: the reply a good policy would
give after the conversation ``history``. :func:`collect_demonstrations` plays episodes through the
real env loop with a scripted engine that answers with those replies, so the token stream (prompt,
reply ids, end-of-turn token, observation deltas, loss mask) is exactly what an RL rollout of the
same conversation would produce. :func:`sft_step` then trains cross-entropy on the ``loss_mask == 1``
tokens, averaged over all of them. A random-init model that cannot yet produce a single valid
reply gets from zero reward to a reward RL can improve on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptContext, ScriptedEngine
from miles_envs.env import Env, Message
from miles_envs.loop import LoopConfig, run_episode
from miles_envs.trainer.batch import pack
from miles_envs.trainer.losses import aggregation_coefficients
from miles_envs.trainer.torch_backend import Trainer
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
    from miles_envs.parsers import parser_for
    from miles_envs.registry import make

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


@dataclass
class SftOptimizer:
    """The warm start's own optimizer, so the RL optimizer's moments start clean."""

    trainer: Trainer
    lr: float = 1e-3

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.trainer.trainable_parameters(), lr=self.lr, weight_decay=0.0)


def sft_step(sft: SftOptimizer, trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """One optimizer step of token-mean cross-entropy over the batch's model tokens."""
    trainer = sft.trainer
    cfg = trainer.config
    coefs = aggregation_coefficients("token_mean", [t.num_model_tokens for t in trajectories], [1.0] * len(trajectories))
    batches = pack(trajectories, [0.0] * len(trajectories), coefs,
                   max_row_tokens=cfg.max_row_tokens, rows_per_micro_batch=cfg.rows_per_micro_batch)
    sft.optimizer.zero_grad(set_to_none=True)
    loss_total = correct = tokens = 0.0
    for batch in batches:
        batch = batch.to(trainer.device)
        logprobs = trainer.forward(batch, replay=False).logprobs
        loss = -(logprobs * batch.token_coef * batch.loss_mask).sum()
        loss.backward()
        loss_total += float(loss.detach())
        # a target is predicted greedily when its probability is above one half (sufficient, cheap)
        correct += float(((logprobs.detach() > -0.6931) * batch.loss_mask).sum())
        tokens += float(batch.loss_mask.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.trainable_parameters(), cfg.max_grad_norm)
    sft.optimizer.step()
    return {"sft/loss": loss_total, "sft/confident_token_frac": correct / max(tokens, 1.0), "sft/grad_norm": float(grad_norm)}


def warm_start(
    trainer: Trainer,
    demonstrations: Sequence[Trajectory],
    steps: int,
    *,
    batch_size: int = 16,
    lr: float = 1e-3,
    on_step: Any = None,
) -> list[dict[str, float]]:
    """``steps`` SFT steps cycling through ``demonstrations`` in batches; leaves ``trainer.step`` at 0."""
    if not demonstrations:
        raise ValueError("warm_start needs at least one demonstration episode")
    sft = SftOptimizer(trainer, lr)
    history = []
    for step in range(steps):
        start = (step * batch_size) % len(demonstrations)
        batch = [demonstrations[(start + i) % len(demonstrations)] for i in range(min(batch_size, len(demonstrations)))]
        metrics = sft_step(sft, batch)
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
    return history
