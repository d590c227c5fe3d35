"""Supervised warm start on demonstration trajectories.

The trajectories come from the env loop like any rollout (see
:func:`miles_envs.pipeline.demonstrations.collect_demonstrations`, which plays an env's own
``demonstration(history)`` replies), so the token stream is exactly what an RL rollout of the same
conversation would produce. :func:`sft_step` trains cross-entropy on the ``loss_mask == 1`` tokens,
averaged over all of them. A random-init model that cannot yet produce a single valid reply gets
from zero reward to a reward RL can improve on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from miles_envs.trainer.batch import pack
from miles_envs.trainer.losses import aggregation_coefficients
from miles_envs.trainer.torch_backend import Trainer
from miles_envs.trajectory import Trajectory


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
