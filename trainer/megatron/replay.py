"""R3 through megatron-core's ``RouterReplay``, fed from a ``PackedBatch``'s routing rows.

Every decoder MoE router of a model built with ``moe_enable_routing_replay`` owns a
``RouterReplay``. For a forward, each gets its layer's rows of ``batch.routed_experts``
(``[rows, T, trace layers, topk]``) flattened in megatron's token order (sequence-major:
token ``t`` of row ``b`` is ``t * rows + b``; under tensor + sequence parallelism each rank takes
its contiguous chunk of that order, the tokens its routers see) and the action ``REPLAY_FORWARD``; megatron then
gathers the trainer's own router scores at those experts, so the gates keep their gradient. With
activation recompute the backward's re-forward pops the same indices (``REPLAY_BACKWARD``).
Dense layers have no router and are skipped; MTP-layer routers are left alone (the rollout has no
trace for them) and route live. Positions without a trace row (-1: padding, trajectories without
routing) keep the live top-k: a forward pre-hook computes it from the router's logits, merges it
with the trace, and also records how often the live choice differs from the rollout's.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from miles_envs.trainer.r3 import RoutingRecord


def decoder_routers(gpt_model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(decoder layer index, TopKRouter)`` of every MoE layer of the main decoder, in order."""
    routers = []
    for index, layer in enumerate(gpt_model.decoder.layers):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            routers.append((index, router))
    return routers


def trace_slots(trace_layers: int, moe_layers: list[int], num_layers: int) -> list[int]:
    """Which trace layer feeds each router: traces list only MoE layers or every decoder layer."""
    if trace_layers == len(moe_layers):
        return list(range(len(moe_layers)))
    if trace_layers == num_layers:
        return list(moe_layers)
    raise ValueError(
        f"routing trace has {trace_layers} layers but the model has {len(moe_layers)} MoE routers in "
        f"{num_layers} decoder layers; the rollout must come from the same architecture"
    )


def megatron_token_order(per_position: torch.Tensor) -> torch.Tensor:
    """``[rows, T, ...]`` -> ``[T * rows, ...]`` in megatron's sequence-major token order."""
    return per_position.transpose(0, 1).reshape(-1, *per_position.shape[2:])


def local_tokens(rows: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This rank's share of ``[T * rows, ...]``: under sequence parallelism each tensor-parallel rank
    routes a contiguous chunk of megatron's token order, the whole of it otherwise."""
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if not sequence_parallel or size == 1:
        return rows
    return rows.chunk(size)[parallel_state.get_tensor_model_parallel_rank()]


def _live_topk(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = router.gating(hidden).view(-1, router.config.num_moe_experts)
        return torch.topk(logits, router.topk, dim=-1).indices


class MegatronRoutingReplay:
    """Drives the ``RouterReplay`` of a ``GPTModel``'s decoder routers from packed batches."""

    def __init__(self, gpt_model: nn.Module) -> None:
        self.routers = decoder_routers(gpt_model)
        if not self.routers:
            raise ValueError("the model has no MoE router: R3 needs an MoE model — turn r3 off")
        if any(router.router_replay is None for _, router in self.routers):
            raise ValueError("the model was built without moe_enable_routing_replay: build it with routing_replay=True")
        if getattr(gpt_model.config, "moe_router_score_function", "softmax") != "softmax":
            raise ValueError("replay merging is implemented for softmax routers only")
        self.num_layers = len(gpt_model.decoder.layers)

    @contextmanager
    def apply(self, routed_experts: torch.Tensor | None, *, replay: bool) -> Iterator[RoutingRecord]:
        """Replay ``routed_experts`` when ``replay``; always record live-vs-rollout disagreement."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        record = RoutingRecord()
        if routed_experts is None:
            yield record
            return
        slots = trace_slots(routed_experts.shape[2], [i for i, _ in self.routers], self.num_layers)
        with ExitStack() as stack:
            for slot, (_, router) in zip(slots, self.routers):
                rows = local_tokens(megatron_token_order(routed_experts[:, :, slot, :]), router.config.sequence_parallel)
                stack.enter_context(_router_hook(router, rows, record, replay))
                if replay:
                    router.router_replay.clear_indices()
                    router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            try:
                yield record
            finally:
                for _, router in self.routers:
                    router.router_replay.clear_router_replay_action()

    def for_recompute(self) -> None:
        """Switch to ``REPLAY_BACKWARD`` before a backward that re-runs the forward."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for _, router in self.routers:
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


@contextmanager
def _router_hook(router: nn.Module, rows: torch.Tensor, record: RoutingRecord, replay: bool):
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    def before(_module, args):
        live = _live_topk(router, args[0])
        replayed = rows.to(live.device)
        if replayed.shape != live.shape:
            raise ValueError(
                f"router sees {tuple(live.shape)} top-k rows, replay has {tuple(replayed.shape)}: "
                "the routing tensor must be aligned with the input positions of the batch"
            )
        valid = (replayed >= 0).all(-1)
        if router.router_replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            record.add(live, replayed, valid)
            router.router_replay.set_target_indices(torch.where(valid.unsqueeze(-1), replayed, live))
        elif not replay:
            record.add(live, replayed, valid)

    handle = router.register_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()
