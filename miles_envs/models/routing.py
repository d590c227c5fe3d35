"""MoE router discovery and routing capture.

Both Qwen3-MoE and DeepSeek-V3 in transformers route through a ``layer.mlp.gate`` module whose
forward returns ``(router_logits, topk_weights, topk_indices)``; ``topk_indices`` has shape
``[tokens, topk]`` with tokens flattened over ``[batch, seq]``. The trainer's R3 replay can use
:func:`moe_routers` to find the same modules and replace their ``topk_indices``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The main decoder stack of a ``*ForCausalLM`` (``model.model.layers``)."""
    return model.get_decoder().layers


def moe_routers(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_index: router}`` for every MoE layer; dense layers are absent."""
    routers = {}
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            routers[index] = mlp.gate
    return routers


def routing_topk(model: nn.Module) -> int:
    """Experts chosen per token (``num_experts_per_tok``)."""
    return int(model.config.num_experts_per_tok)


class RoutingRecorder:
    """Records ``topk_indices`` of every MoE router during forwards run inside :meth:`record`.

    After a forward over inputs of shape ``[batch, seq]``, :meth:`take` returns an int32 tensor
    ``[batch, seq, num_hidden_layers, topk]`` in SGLang's layout: dense layers hold zero rows.
    """

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(
                f"{type(model).__name__} has no MoE layers: routing capture needs a mixture-of-experts model "
                "(e.g. qwen3-moe or deepseek-v3)"
            )
        self.num_layers = len(decoder_layers(model))
        self.topk = routing_topk(model)
        self._captured: dict[int, torch.Tensor] = {}

    @contextmanager
    def record(self) -> Iterator[RoutingRecorder]:
        handles = [router.register_forward_hook(self._hook(index)) for index, router in self.routers.items()]
        self._captured.clear()
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int):
        def capture(_module, _inputs, output):
            self._captured[index] = output[2].detach()

        return capture

    def take(self, batch: int, seq: int) -> torch.Tensor:
        rows = torch.zeros(batch, seq, self.num_layers, self.topk, dtype=torch.int32)
        for index, indices in self._captured.items():
            rows[:, :, index] = indices.reshape(batch, seq, self.topk).to("cpu", torch.int32)
        self._captured.clear()
        return rows
