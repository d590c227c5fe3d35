"""All local experts of an MoE layer in two grouped GEMMs, without transformer-engine.

megatron-core's experts without transformer-engine are ``SequentialMLP``: one small MLP call per
expert (dozens of kernel launches and Python calls each, forward and backward). ``GroupedMLP``
keeps its parameters, names and sharded state (``local_experts.{e}.linear_fc1/2.weight``, so the
HF <-> megatron mapping and checkpoints are unchanged) and runs all experts at once with
``grouped_mm`` over the permuted tokens: the expert weights are stacked per call (their gradients
flow back to each expert's own parameter, under megatron's DDP straight into its fp32 gradient
buffer), the group boundaries are the cumulative token counts on the device (host counts are
copied there). The math is ``SequentialMLP``'s: fc1, gated activation, the routing probability applied
in the activation's dtype, fc2.

Where ``grouped_mm`` cannot run (no such op in this torch, a CUDA card before sm90 or a dtype other
than bf16 there, expert tensor parallelism, biases, quantised or un-gated experts, unaligned
widths) the layer runs ``SequentialMLP``'s own loop: the fallback is megatron's code, exact by
construction. ``runs_grouped`` says which path a forward takes.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_ALIGN_BYTES = 16  # grouped_mm needs every row stride to be a multiple of 16 bytes


def _offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """End offset of each expert's rows (int32, on ``device``): host counts are copied, not synced."""
    return tokens_per_expert.to(device, non_blocking=True).cumsum(0).to(torch.int32)


def _dense_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()  # grouped_mm's backward refuses broadcast (zero-stride) gradients


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows[offsets[e-1]:offsets[e]] @ weights[e].T`` for every expert ``e`` (``weights``: [E, out, in])."""
    out = _grouped_mm(rows, weights.transpose(1, 2), offs=offsets)
    if out.requires_grad:
        out.register_hook(_dense_grad)
    return out


class _StackedWeights(torch.autograd.Function):
    """``torch.stack`` of the experts' weights. Under megatron's DDP every weight has a ``main_grad``
    (its slice of the fp32 gradient buffer): the backward then adds all experts' gradients into them
    with one multi-tensor op and hands autograd none, instead of one gradient accumulation and one
    DDP hook ``add_`` per expert and micro-batch (two launches and two host calls each; the backend's
    DDP reduces gradients after the backward, ``overlap_grad_reduce=False``, so it needs no
    per-parameter ready signal). Without
    ``main_grad`` the gradients go to ``.grad`` as ``torch.stack``'s do."""

    @staticmethod
    def forward(ctx, *weights):
        ctx.weights = weights
        return torch.stack(weights)

    @staticmethod
    def backward(ctx, grad):
        main_grads = [getattr(weight, "main_grad", None) for weight in ctx.weights]
        if any(g is None for g in main_grads) or len({g.dtype for g in main_grads}) != 1:
            return grad.unbind(0)
        torch._foreach_add_(main_grads, list(grad.to(main_grads[0].dtype).unbind(0)))
        return (None,) * len(ctx.weights)


def stacked_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[E, out, in]``: the experts' weights, gradients straight into DDP's buffer (``_StackedWeights``)."""
    return _StackedWeights.apply(*weights)


class GroupedMLP(SequentialMLP):
    """``SequentialMLP`` with its experts run as grouped GEMMs (see module docstring)."""

    def _config_allows_grouping(self) -> bool:
        cfg = self.config
        return (
            _grouped_mm is not None
            and self.num_local_experts > 1
            and cfg.gated_linear_unit
            and not cfg.add_bias_linear
            and not cfg.bias_activation_fusion
            and not getattr(cfg, "fp8", None)
            and not getattr(cfg, "fp4", None)
            and not getattr(cfg, "moe_apply_probs_on_input", False)
            and not getattr(cfg, "use_te_activation_func", False)
            and getattr(cfg, "activation_func_clamp_value", None) is None
            and (self.tp_group is None or self.tp_group.size() == 1)
        )

    def runs_grouped(self, hidden: torch.Tensor) -> bool:
        """Whether a forward on ``hidden`` takes the grouped path (else ``SequentialMLP``'s loop)."""
        if not self._config_allows_grouping():
            return False
        if hidden.is_cuda and (hidden.dtype != torch.bfloat16 or torch.cuda.get_device_capability(hidden.device) < (9, 0)):
            return False
        fc1 = self.local_experts[0].linear_fc1.weight
        align = _ALIGN_BYTES // hidden.element_size()
        aligned_rows = hidden.stride(-1) == 1 and hidden.data_ptr() % _ALIGN_BYTES == 0
        return aligned_rows and fc1.dtype == hidden.dtype and fc1.shape[0] % (2 * align) == 0 and fc1.shape[1] % align == 0

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden = permuted_local_hidden_states
        if not self.runs_grouped(hidden):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        offsets = _offsets(tokens_per_expert, hidden.device)
        fc1 = stacked_weights([expert.linear_fc1.weight for expert in self.local_experts])  # [E, 2I, H]
        fc2 = stacked_weights([expert.linear_fc2.weight for expert in self.local_experts])  # [E, H, I]
        gate, linear = grouped_mm(hidden, fc1, offsets).chunk(2, dim=-1)
        activated = self.config.activation_func(gate) * (linear + self.config.glu_linear_offset)
        activated = (activated * permuted_probs.unsqueeze(-1)).to(activated.dtype)
        return grouped_mm(activated, fc2, offsets), None


EXPERTS = {"grouped": GroupedMLP, "sequential": SequentialMLP}


def with_experts(spec, module: type):
    """``spec`` (a layer/block spec tree) with every ``SequentialMLP`` experts spec building ``module``.

    megatron-core <= 0.16 writes specs as ``ModuleSpec`` trees, 0.19 as ``functools.partial``
    builders of dataclass submodules; both are walked.
    """
    if isinstance(spec, ModuleSpec):
        if spec.module is SequentialMLP:
            return dataclasses.replace(spec, module=module)
        return dataclasses.replace(spec, submodules=with_experts(spec.submodules, module))
    if isinstance(spec, functools.partial):
        func = module if spec.func is SequentialMLP else spec.func
        args = [with_experts(a, module) for a in spec.args]
        return functools.partial(func, *args, **{k: with_experts(v, module) for k, v in spec.keywords.items()})
    if isinstance(spec, list):
        return [with_experts(s, module) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_experts(getattr(spec, f.name), module) for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec
