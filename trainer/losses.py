"""Policy losses, importance-sampling correction, KL and entropy on flattened token tensors.

All tensors are 1-D over the token positions of a micro-batch (padding included, masked out by
``loss_mask``). A policy loss returns the *per-token* loss; the trainer multiplies it by per-token
aggregation coefficients (see :func:`aggregation_coefficients`) so that summing over micro-batches
gives exactly the batch-level aggregate. Custom losses with the :data:`PolicyLossFn` signature plug
in by import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PolicyLossInput:
    logprobs: torch.Tensor  # trainer logprobs of the targets (with grad)
    old_logprobs: torch.Tensor  # behaviour logprobs for the ratio (no grad)
    advantages: torch.Tensor
    loss_mask: torch.Tensor  # float 0/1
    seq_index: torch.Tensor  # sequence number within the micro-batch, -1 on padding
    num_sequences: int
    eps_low: float
    eps_high: float


PolicyLossFn = Callable[[PolicyLossInput], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _clipped_surrogate(ratio: torch.Tensor, batch: PolicyLossInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unclipped = -batch.advantages * ratio
    clipped = -batch.advantages * ratio.clamp(1.0 - batch.eps_low, 1.0 + batch.eps_high)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).float(), batch.loss_mask)
    return loss, {"clipfrac": clipfrac.detach()}


def ppo_clip(batch: PolicyLossInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clip with asymmetric range ``[1 - eps_low, 1 + eps_high]`` (DAPO clip-higher)."""
    ratio = torch.exp(batch.logprobs - batch.old_logprobs)
    return _clipped_surrogate(ratio, batch)


def gspo(batch: PolicyLossInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: sequence ratio ``exp(mean_t log r_t)`` over model tokens, clipped per sequence.

    Written in the token form ``sg[s_i] * exp(logp_t - sg[logp_t])``: the value of every token is the
    sequence ratio, and with per-sequence mean aggregation the gradient equals the sequence-level one.
    """
    log_ratio = (batch.logprobs - batch.old_logprobs) * batch.loss_mask
    seq = batch.seq_index.clamp(min=0)
    sums = torch.zeros(batch.num_sequences, dtype=log_ratio.dtype, device=log_ratio.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, seq, log_ratio.detach())
    counts = counts.index_add(0, seq, batch.loss_mask)
    seq_log_ratio = (sums / counts.clamp(min=1))[seq]
    ratio = torch.exp(seq_log_ratio + batch.logprobs - batch.logprobs.detach())
    return _clipped_surrogate(ratio, batch)


POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": ppo_clip, "gspo": gspo}


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """TIS: ``min(pi_old / pi_rollout, cap)``, no gradient; corrects the rollout/trainer mismatch."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap).detach()


def version_aware_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    versions: torch.Tensor,
    trainer_version: int,
    *,
    cap: float | None,
    decay: float,
) -> torch.Tensor:
    """Per-token off-policy weights of asynchronous training, no gradient.

    Token ``t`` was sampled by weights version ``v_t`` (``versions``, -1 where unknown) with the
    recorded logprob ``log mu_{v_t}(y_t)``; the trainer is at version ``V`` with logprob
    ``log pi_old(y_t)``. Its lag is ``l_t = max(0, V - v_t)`` (0 where unknown) and its weight

        w_t = min(pi_old(y_t) / mu_{v_t}(y_t), cap) * decay ** l_t

    The ratio is the truncated importance weight against the policy that actually sampled the
    token: a trajectory that spans a weight update has tokens of two behaviour policies, and each
    token's recorded logprob is its own policy's, so each is corrected against the right one
    (the behaviour correction of decoupled PPO, with ``pi_old`` as the proximal policy). ``decay``
    (in ``(0, 1]``) further discounts tokens by how stale they are; 1 leaves plain TIS. ``cap`` None
    drops the ratio and keeps only the decay.
    """
    weights = torch.ones_like(old_logprobs) if cap is None else truncated_importance_weights(old_logprobs, rollout_logprobs, cap)
    if decay != 1.0:
        lag = torch.where(versions >= 0, (trainer_version - versions).clamp(min=0), torch.zeros_like(versions))
        weights = weights * torch.pow(torch.full_like(weights, decay), lag.to(weights.dtype))
    return weights.detach()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and the entropy of each position's distribution (fp32)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target_logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return target_logprobs, entropy


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_coefficients(
    mode: str, loss_tokens: list[int], weights: list[float], norm_length: int | None = None
) -> list[float]:
    """Per-token loss coefficient of each trajectory so that ``sum(coef * token_loss)`` aggregates.

    ``token_mean``: every model token of the batch counts equally (DAPO).
    ``seq_mean_token_mean``: mean over tokens, then over sequences (GRPO as published).
    ``seq_mean_token_sum_norm``: token sum divided by a constant length, mean over sequences (Dr.GRPO);
    the constant is ``norm_length`` or the longest response in the batch.
    """
    num_seqs = max(1, sum(1 for n in loss_tokens if n > 0))
    if mode == "token_mean":
        total = max(1, sum(loss_tokens))
        return [w / total for w in weights]
    if mode == "seq_mean_token_mean":
        return [w / (num_seqs * n) if n else 0.0 for n, w in zip(loss_tokens, weights)]
    if mode == "seq_mean_token_sum_norm":
        length = norm_length or max(loss_tokens, default=1) or 1
        return [w / (num_seqs * length) for w in weights]
    raise ValueError(f"unknown loss aggregation {mode!r}: choose one of {', '.join(AGGREGATIONS)}")
