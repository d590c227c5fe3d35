"""Token dispatch for one expert-parallel rank that never reads the device from the host.

megatron-core's dispatchers hand the experts host-side token counts: the alltoall one copies the
per-expert counts to the host and waits for them in every MoE layer forward (and without
transformer-engine its permutation selects with ``masked_select`` and re-sorts chunks with
``split``/``cat`` over host sizes); the allgather one calls ``.cpu()`` on them. With all experts on
one rank (expert parallel 1, expert tensor parallel 1) no count has to cross to the host: the
permutation is a stable sort of the routing map, whose size is known without looking (dropless
top-k routing selects exactly ``topk`` experts per token), and ``experts.GroupedMLP`` takes the
per-expert counts as a device tensor (its group offsets are their cumulative sum).

The permuted order is megatron's (expert-major, tokens ascending within an expert), the probabilities
are gathered from the same ``[tokens, experts]`` entries and the combine sums each token's expert
outputs, so outputs and gradients equal megatron's dispatcher. The router (and with it R3's
``RouterReplay``) runs before dispatch and is untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def supports_device_dispatch(dispatcher: MoETokenDispatcher) -> bool:
    """Whether the MoE layer owning ``dispatcher`` can dispatch on the device: all its experts on this
    rank, dropless routing without capacity padding, no shared-expert overlap."""
    cfg = dispatcher.config
    return (
        _group_size(dispatcher.tp_ep_group) == 1
        and cfg.moe_expert_capacity_factor is None
        and not cfg.moe_pad_expert_input_to_capacity
        and not getattr(cfg, "moe_router_padding_for_quantization", False)
        and not getattr(cfg, "moe_shared_expert_overlap", False)
        and not getattr(cfg, "moe_latent_size", None)
    )


class DeviceTokenDispatcher(MoETokenDispatcher):
    """Dropless dispatch with all experts local: sort, gather, experts, scatter-add (see module docstring)."""

    def __init__(self, config, pg_collection, num_experts: int) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_experts = num_experts
        self.topk = config.moe_router_topk
        self.token_of: torch.Tensor | None = None  # [tokens * topk]: the input row of each permuted row
        self.tokens_per_expert: torch.Tensor | None = None

    @classmethod
    def replacing(cls, dispatcher: MoETokenDispatcher) -> DeviceTokenDispatcher:
        groups = SimpleNamespace(ep=dispatcher.ep_group, expt_tp=dispatcher.tp_group, tp_ep=dispatcher.tp_ep_group)
        return cls(dispatcher.config, groups, dispatcher.config.num_moe_experts)

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.view(-1, self.hidden_shape[-1])
        tokens = hidden.shape[0]
        # (expert, token) pairs in expert-major order; a stable sort puts the selected ones first,
        # tokens ascending within each expert, and dropless top-k selects exactly tokens x topk
        selected = routing_map.t().reshape(-1)
        pairs = torch.sort(selected.to(torch.uint8), descending=True, stable=True).indices[: tokens * self.topk]
        expert_of = torch.div(pairs, tokens, rounding_mode="floor")
        self.token_of = pairs - expert_of * tokens
        self.tokens_per_expert = routing_map.sum(dim=0, dtype=torch.long)
        permuted_probs = probs.reshape(-1).index_select(0, self.token_of * self.num_experts + expert_of)
        return hidden.index_select(0, self.token_of), permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = self.hidden_shape.numel() // self.hidden_shape[-1]
        output = hidden_states.new_zeros(rows, hidden_states.shape[-1]).index_add_(0, self.token_of, hidden_states)
        self.token_of = None
        return output.view(self.hidden_shape)


def install_device_dispatch(gpt_model: torch.nn.Module) -> int:
    """Give every MoE layer of ``gpt_model`` (decoder and MTP layers) that ``supports_device_dispatch``
    a ``DeviceTokenDispatcher``; returns how many layers got one."""
    installed = 0
    for module in gpt_model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        if isinstance(dispatcher, MoETokenDispatcher) and not isinstance(dispatcher, DeviceTokenDispatcher):
            if supports_device_dispatch(dispatcher):
                module.token_dispatcher = DeviceTokenDispatcher.replacing(dispatcher)
                installed += 1
    return installed
