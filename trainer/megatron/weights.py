"""HF <-> megatron-core weight mapping for the architectures of ``model.SUPPORTED``.

The HF side is the in-memory naming of a transformers model (per-layer fused expert tensors
``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) plus the MTP stack as
``mtp.<MtpModel key>`` — the naming of ``Trainer.state_dict()`` that the embedded engine's
``update_weights`` takes. Every rule is a pure re-layout (split, stack, interleave), so
HF -> megatron -> HF is bit-exact.

The MTP block is ``mtp.layers.{d}.transformer_layer`` in megatron-core <= 0.16 and
``mtp_model_layer`` from 0.19 on. megatron's fused QKV weight is grouped per KV head: for each query group ``[q heads of the group;
k; v]`` rows. Experts are ``SequentialMLP`` local experts; with expert parallelism rank ``r`` holds
global experts ``r * n_local .. (r + 1) * n_local - 1``. Loading shards every tensor-parallel
parameter along megatron's own ``partition_dim`` (a gated ``linear_fc1`` per half, so each rank
holds its slice of gate and of up); exporting gathers experts over the expert-parallel group and is
mapped for ``tensor_parallel=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    mg: tuple[str, ...]
    to_mg: Callable[[Tensors], Tensors]
    to_hf: Callable[[Tensors], Tensors]


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def _copy(hf: str, mg: str) -> Rule:
    return Rule((hf,), (mg,), _same, _same)


def _qkv_rule(prefix_hf: str, mg: str, heads: int, groups: int, head_dim: int) -> Rule:
    per_group = heads // groups

    def to_mg(ts: Tensors) -> Tensors:
        q, k, v = ts
        hidden = q.shape[-1]
        q = q.view(groups, per_group * head_dim, hidden)
        k = k.view(groups, head_dim, hidden)
        v = v.view(groups, head_dim, hidden)
        return [torch.cat([q, k, v], dim=1).reshape(-1, hidden)]

    def to_hf(ts: Tensors) -> Tensors:
        (qkv,) = ts
        hidden = qkv.shape[-1]
        q, k, v = qkv.view(groups, (per_group + 2) * head_dim, hidden).split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]

    names = tuple(f"{prefix_hf}self_attn.{p}_proj.weight" for p in "qkv")
    return Rule(names, (mg,), to_mg, to_hf)


def _experts_rule(hf: str, mg_names: tuple[str, ...], offset: int) -> Rule:
    count = len(mg_names)
    return Rule(
        (hf,),
        mg_names,
        lambda ts: list(ts[0][offset : offset + count].unbind(0)),
        lambda ts: [torch.stack(ts)],
    )


def _dense_mlp_rules(hf: str, mg: str) -> list[Rule]:
    return [
        Rule(
            (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
            (f"{mg}mlp.linear_fc1.weight",),
            lambda ts: [torch.cat(ts, dim=0)],
            lambda ts: list(ts[0].chunk(2, dim=0)),
        ),
        _copy(f"{hf}mlp.down_proj.weight", f"{mg}mlp.linear_fc2.weight"),
    ]


class WeightMap:
    """The rules for one (HF config, megatron model) pair; ``mg_keys`` are the model's own names."""

    def __init__(self, hf_config, mg_keys: set[str], *, expert_rank: int = 0) -> None:
        self.config = hf_config
        self.mg_keys = mg_keys
        self.expert_rank = expert_rank
        self.rules: list[Rule] = [_copy("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
        self.rules.append(_copy("model.norm.weight", "decoder.final_layernorm.weight"))
        if not hf_config.tie_word_embeddings:
            self.rules.append(_copy("lm_head.weight", "output_layer.weight"))
        for i in range(hf_config.num_hidden_layers):
            self.rules += self._layer(f"model.layers.{i}.", f"decoder.layers.{i}.")
        from miles_envs.trainer.megatron.model import mtp_depth

        for d in range(mtp_depth(hf_config)):
            hf, mg = f"mtp.layers.{d}.", f"mtp.layers.{d}."
            self.rules += [_copy(f"{hf}{n}.weight", f"{mg}{n}.weight") for n in ("enorm", "hnorm", "eh_proj")]
            self.rules.append(_copy(f"{hf}post_norm.weight", f"{mg}final_layernorm.weight"))
            block = next((f"{mg}{n}." for n in ("transformer_layer", "mtp_model_layer") if any(k.startswith(f"{mg}{n}.") for k in mg_keys)), "")
            self.rules += self._layer(f"{hf}mtp_block.", block or f"{mg}transformer_layer.")
        missing = sorted({k for r in self.rules for k in r.mg} - mg_keys)
        if missing:
            raise ValueError(f"megatron model lacks {missing[:4]}: it was not built from this HF config")

    def _pick(self, *candidates: str) -> str:
        """The first name the model has (local spec vs transformer-engine fused-norm names)."""
        return next((c for c in candidates if c in self.mg_keys), candidates[0])

    def _layer(self, hf: str, mg: str) -> list[Rule]:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        attn = f"{mg}self_attention."
        rules = [
            _copy(f"{hf}input_layernorm.weight", self._pick(f"{mg}input_layernorm.weight", f"{attn}linear_qkv.layer_norm_weight")),
            _qkv_rule(hf, f"{attn}linear_qkv.weight", c.num_attention_heads, c.num_key_value_heads, head_dim),
            _copy(f"{hf}self_attn.o_proj.weight", f"{attn}linear_proj.weight"),
            _copy(f"{hf}self_attn.q_norm.weight", f"{attn}q_layernorm.weight"),
            _copy(f"{hf}self_attn.k_norm.weight", f"{attn}k_layernorm.weight"),
            _copy(
                f"{hf}post_attention_layernorm.weight",
                self._pick(f"{mg}pre_mlp_layernorm.weight", f"{mg}mlp.linear_fc1.layer_norm_weight"),
            ),
        ]
        if not getattr(c, "num_experts", None):
            return rules + _dense_mlp_rules(hf, mg)
        experts = f"{mg}mlp.experts.local_experts."
        local = sum(1 for k in self.mg_keys if k.startswith(experts) and k.endswith(".linear_fc1.weight"))
        offset = self.expert_rank * local
        fc1 = tuple(f"{experts}{e}.linear_fc1.weight" for e in range(local))
        fc2 = tuple(f"{experts}{e}.linear_fc2.weight" for e in range(local))
        return rules + [
            _copy(f"{hf}mlp.gate.weight", f"{mg}mlp.router.weight"),
            _experts_rule(f"{hf}mlp.experts.gate_up_proj", fc1, offset),
            _experts_rule(f"{hf}mlp.experts.down_proj", fc2, offset),
        ]

    @property
    def hf_keys(self) -> set[str]:
        return {k for r in self.rules for k in r.hf}

    def to_megatron(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(self.hf_keys - hf_state.keys())
        if missing:
            raise KeyError(f"HF weights lack {missing[:4]} (of {len(missing)}): wrong checkpoint for this config?")
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            out.update(zip(rule.mg, rule.to_mg([hf_state[k] for k in rule.hf])))
        return out

    def to_hf(self, mg_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            out.update(zip(rule.hf, rule.to_hf([mg_state[k] for k in rule.mg])))
        return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / ``Float16Module`` wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in unwrap(model).state_dict().items() if not k.endswith("_extra_state")}


def weight_map(hf_config, model: torch.nn.Module) -> WeightMap:
    from megatron.core import parallel_state

    return WeightMap(hf_config, set(_weights_of(model)), expert_rank=parallel_state.get_expert_model_parallel_rank())


def _tensor_parallel_shard(name: str, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full (unsharded) megatron tensor ``full`` for parameter ``param``."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False) or full.shape == param.shape:
        return full
    dim = param.partition_dim
    parts = full.shape[dim] // param.shape[dim]
    expert = getattr(param, "allreduce", True) is False  # megatron marks expert parameters so
    rank = parallel_state.get_expert_tensor_parallel_rank() if expert else parallel_state.get_tensor_model_parallel_rank()
    if name.endswith("linear_fc1.weight") and dim == 0:  # gated: [gate; up], each sharded alike
        return torch.cat([half.chunk(parts, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(parts, dim)[rank]


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_config, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy HF-named weights into a megatron model (cast to each parameter's dtype, sharded for TP)."""
    target = _weights_of(model)
    params = dict(unwrap(model).named_parameters())
    for name, tensor in weight_map(hf_config, model).to_megatron(hf_state).items():
        if name in params:
            tensor = _tensor_parallel_shard(name, tensor, params[name])
        target[name].copy_(tensor)


@torch.no_grad()
def export_hf_weights(model: torch.nn.Module, hf_config) -> dict[str, torch.Tensor]:
    """HF-named weights of a megatron model (expert shards gathered over the expert-parallel group)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("exporting HF weights is mapped for tensor_parallel=1 only; use expert parallelism for MoE")
    mapping = weight_map(hf_config, model)
    state = mapping.to_hf({k: v.detach() for k, v in _weights_of(model).items()})
    return _gather_experts(state)


def _gather_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return state
    group = parallel_state.get_expert_model_parallel_group()
    for key in [k for k in state if ".mlp.experts." in k]:
        shards = [torch.empty_like(state[key]) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, state[key].contiguous(), group=group)
        state[key] = torch.cat(shards, dim=0)
    return state
