"""R3 (Rollout Routing Replay) for HF MoE models, and the rollout/trainer mismatch metrics.

During the training forward, every MoE router (``layer.mlp.gate``, found by
``miles_envs.models.routing.moe_routers``; its forward returns ``(router_logits, topk_weights,
topk_indices)``) has its expert indices replaced by the rollout's. The gate weights are recomputed
from the trainer's own router logits at those experts, so the router keeps its gradient:

- softmax routers (Qwen2/Qwen3-MoE): softmax over all experts, gather, renormalise when
  ``norm_topk_prob``;
- sigmoid routers with a score-correction bias (DeepSeek-V3): sigmoid, gather, renormalise when
  ``norm_topk_prob``, times ``routed_scaling_factor`` (the bias only steers the choice).

Rows without a replay entry (-1: padding, or trajectories without a routing trace) keep the live
top-k.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from miles_envs.models.routing import decoder_layers, moe_routers


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(decoder layer index, router)`` for every MoE layer, in layer order; [] for dense models."""
    try:
        return sorted(moe_routers(model).items())
    except AttributeError:  # not a decoder-only causal LM
        return []


def _is_sigmoid_router(router: nn.Module) -> bool:
    if not hasattr(router, "norm_topk_prob"):
        raise ValueError(
            f"R3 does not know how {type(router).__name__} turns logits into gate weights; "
            "supported: softmax routers with norm_topk_prob (Qwen-MoE) and DeepSeek-V3 sigmoid routers"
        )
    return hasattr(router, "e_score_correction_bias")


def gate_weights(router: nn.Module, router_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The router's own gate weights for the experts ``indices`` (differentiable in the logits)."""
    if _is_sigmoid_router(router):
        weights = torch.sigmoid(router_logits.float()).gather(-1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor
    weights = torch.softmax(router_logits, dim=-1, dtype=torch.float).gather(-1, indices)
    if router.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights


@dataclass
class RoutingRecord:
    """Counts of (token, layer) pairs whose live top-k set differs from the replayed one."""

    disagreements: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    pairs: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    def add(self, live: torch.Tensor, replayed: torch.Tensor, valid: torch.Tensor) -> None:
        differs = (live.sort(-1).values != replayed.sort(-1).values).any(-1) & valid
        self.disagreements = self.disagreements + differs.sum()  # read once, in ``disagreement``: no host sync per layer
        self.pairs = self.pairs + valid.sum()

    def merge(self, other: RoutingRecord) -> None:
        self.disagreements = self.disagreements + other.disagreements
        self.pairs = self.pairs + other.pairs

    @property
    def disagreement(self) -> float:
        return float(self.disagreements) / max(1, int(self.pairs))


class RoutingReplay:
    """Hooks an MoE model's routers; use :meth:`apply` around each training forward."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(
                f"{type(model).__name__} has no MoE router (layer.mlp.gate); "
                "R3 needs an MoE model — turn r3 off for dense models"
            )
        for _, router in self.routers:
            _is_sigmoid_router(router)  # fails early, naming the router type R3 cannot recompute
        self.num_hidden_layers = len(decoder_layers(model))

    def trace_slots(self, trace_layers: int) -> list[int]:
        """Which layer of the routing trace feeds each router.

        A trace lists either only the MoE layers (one entry per router) or every decoder layer
        (SGLang's layout, dense layers holding zero rows).
        """
        if trace_layers == len(self.routers):
            return list(range(len(self.routers)))
        if trace_layers == self.num_hidden_layers:
            return [layer for layer, _ in self.routers]
        raise ValueError(
            f"routing trace has {trace_layers} layers but the model has {len(self.routers)} MoE routers "
            f"in {self.num_hidden_layers} decoder layers; the rollout must come from the same architecture"
        )

    @contextmanager
    def apply(self, routed_experts: torch.Tensor | None, *, replay: bool) -> Iterator[RoutingRecord]:
        """Replay ``routed_experts`` ([batch, T, layers, topk], -1 = none) when ``replay``; always record.

        With ``replay=False`` the forward is untouched and only the disagreement is measured.
        """
        record = RoutingRecord()
        if routed_experts is None:
            yield record
            return
        flat = routed_experts.reshape(-1, *routed_experts.shape[-2:])
        slots = self.trace_slots(flat.shape[1])
        num_experts = min(router.num_experts for _, router in self.routers)
        if flat.numel() and int(flat.max()) >= num_experts:
            raise ValueError(f"replayed expert id {int(flat.max())} >= num_experts {num_experts}: wrong model for this trace")
        handles = [
            router.register_forward_hook(self._hook(flat[:, slot, :], record, replay))
            for slot, (_, router) in zip(slots, self.routers)
        ]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(replayed: torch.Tensor, record: RoutingRecord, replay: bool):
        def hook(router: nn.Module, _inputs, output):
            router_logits, live_weights, live = output
            if live.shape != replayed.shape:
                raise ValueError(
                    f"router sees {tuple(live.shape)} top-k rows, replay has {tuple(replayed.shape)}: "
                    "the routing tensor must be aligned with the input positions of the batch"
                )
            valid = (replayed >= 0).all(-1)
            record.add(live, replayed, valid)
            if not replay:
                return None
            chosen = torch.where(valid.unsqueeze(-1), replayed.to(live.dtype), live)
            return router_logits, gate_weights(router, router_logits, chosen).to(live_weights.dtype), chosen

        return hook


def mismatch_sums(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``mismatch_metrics``' sums over the masked tokens and their count, left on the tensors'
    device (a trainer adds them up over micro-batches and reads them once)."""
    mask = loss_mask.bool()
    delta = torch.where(mask, trainer_logprobs.detach().double() - rollout_logprobs.double(), 0.0)
    sums = {
        "k3_kl": (torch.exp(delta) - 1.0 - delta).sum(),
        "extreme_frac": (delta.abs() > math.log(2.0)).sum(),
        "mean_abs_delta": delta.abs().sum(),
    }
    return sums, mask.sum()


def mismatch_metrics(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, float]:
    """Rollout/trainer mismatch over model tokens, Δ = trainer logprob − rollout logprob."""
    sums, tokens = mismatch_sums(trainer_logprobs, rollout_logprobs, loss_mask)
    return {name: float(total) / max(1, int(tokens)) for name, total in sums.items()}
