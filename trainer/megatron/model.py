"""megatron-core ``GPTModel`` built from a Hugging Face config.

Supported: Qwen3-MoE (and dense Qwen3), optionally with MTP layers in the DeepSeek NextN layout
(``num_nextn_predict_layers``). The layer spec is transformer-engine's when TE imports, megatron's
local one otherwise (experts as ``SequentialMLP``, so weight names do not depend on grouped GEMM); without TE the experts
run as ``experts.GroupedMLP`` (the same parameters, all experts in two grouped GEMMs) unless
``experts="sequential"`` asks for megatron's per-expert loop.
The router keeps megatron's own top-k code path: ``moe_router_fusion`` stays off so that R3's
``RouterReplay`` sees every top-k call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


DISPATCHERS = ("device", "alltoall", "allgather")
EXPERT_KINDS = ("grouped", "sequential")  # the keys of experts.EXPERTS (that module imports megatron)


@dataclass(frozen=True)
class MegatronSettings:
    """Parallel sizes and numerics of the megatron backend (from the ``--tp/--ep`` flags)."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    bf16: bool = False
    routing_replay: bool = False  # build RouterReplay into every router (R3)
    mtp_loss_scale: float = 0.2
    # "device": dispatch.DeviceTokenDispatcher where all experts are on one rank (no host read per MoE
    # layer), megatron's alltoall elsewhere; or megatron's own "alltoall" / "allgather" (the CPU/gloo path)
    token_dispatcher: str = "device"
    use_cpu_initialization: bool = False
    recompute: bool = False  # full activation recompute (REPLAY_BACKWARD replays the routing)
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks (DP > 1; not checkpointed)
    attention: str = "packed"  # "packed": causal SDPA per sequence; "dense": megatron's masked attention (reference)
    experts: str = "grouped"  # "grouped": experts.GroupedMLP; "sequential": megatron's per-expert loop (reference)
    # "fused": logprobs, entropy and MTP cross-entropy chunk by chunk (vocab_head.py; tensor_parallel=1 only,
    # megatron's vocab-parallel output layer otherwise); "unfused": megatron's output layer, full logits (reference)
    vocab_head: str = "fused"
    head_chunk_tokens: int = 4096  # tokens per chunk of the fused head's logits
    head_vocab_align: int = 64  # the fused head's matmuls pad the vocabulary to a multiple of this (1: none)

    def __post_init__(self) -> None:
        """Refuse an unknown choice here, before any model is built or weights are loaded."""
        choices = {"token_dispatcher": DISPATCHERS, "experts": EXPERT_KINDS, "attention": ("packed", "dense")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.vocab_head not in ("fused", "unfused"):
            raise ValueError(f"vocab_head={self.vocab_head!r}: choose 'fused' (chunked) or 'unfused' (full logits)")
        for name in ("tensor_parallel", "expert_parallel", "head_chunk_tokens", "head_vocab_align"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: a whole number of at least 1")


SUPPORTED = ("qwen3_moe", "qwen3")


def megatron_dispatcher(settings: MegatronSettings) -> str:
    """megatron's ``moe_token_dispatcher_type`` to build with: ``"device"`` builds with the allgather
    dispatcher (nothing CUDA-only in its constructor) and ``build_gpt_model`` swaps it for the
    device one where every expert is local; across ranks it is megatron's alltoall."""
    if settings.token_dispatcher != "device":
        return settings.token_dispatcher
    return "allgather" if settings.tensor_parallel * settings.expert_parallel == 1 else "alltoall"


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def mtp_depth(hf_config) -> int:
    from miles_envs.models.mtp import mtp_layer_count

    return mtp_layer_count(hf_config)


def transformer_config(hf_config, settings: MegatronSettings):
    """The megatron ``TransformerConfig`` equivalent of ``hf_config``."""
    from megatron.core.transformer import TransformerConfig

    kind = hf_config.model_type
    if kind not in SUPPORTED:
        raise ValueError(
            f"the megatron backend has no mapping for model_type {kind!r}: supported {', '.join(SUPPORTED)}; "
            "use the torch backend for other architectures"
        )
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not mapped (Qwen3 checkpoints have none)")
    values = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=settings.tensor_parallel,
        expert_model_parallel_size=settings.expert_parallel,
        # megatron's torch norms refuse sequence parallelism: it needs transformer-engine's
        sequence_parallel=settings.tensor_parallel > 1 and have_transformer_engine(),
        bf16=settings.bf16,
        params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        use_cpu_initialization=settings.use_cpu_initialization,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
    )
    if kind == "qwen3_moe":
        values.update(
            num_moe_experts=hf_config.num_experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            # softmax over the top-k logits == softmax over all experts renormalised on the top-k
            moe_router_pre_softmax=not hf_config.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=megatron_dispatcher(settings),
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            moe_enable_routing_replay=settings.routing_replay,
        )
        if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise ValueError("Qwen3-MoE configs with dense layers (mlp_only_layers/decoder_sparse_step) are not mapped")
    depth = mtp_depth(hf_config)
    if depth:
        values.update(mtp_num_layers=depth, mtp_loss_scaling_factor=settings.mtp_loss_scale)
    if settings.recompute:
        values.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    if depth and "mtp_detach_heads" in known:  # megatron-core >= 0.19: MTP loss trains only the MTP layers
        values["mtp_detach_heads"] = True
    return TransformerConfig(**{k: v for k, v in values.items() if k in known})


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16 reads ``moe_utils.te_general_gemm`` even when transformer-engine is absent
    (NameError in the router); defining it as None selects its plain ``torch.mm`` path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(hf_config, settings: MegatronSettings):
    """A ``GPTModel`` with the architecture of ``hf_config`` (weights random: load them after)."""
    from megatron.core.models.gpt import GPTModel

    _define_missing_te_gemm()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    config = transformer_config(hf_config, settings)
    use_te = have_transformer_engine()
    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te)
    from miles_envs.trainer.megatron.experts import EXPERTS, with_experts

    if not use_te:
        block_spec = with_experts(block_spec, EXPERTS[settings.experts])
    mtp_spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_te) if config.mtp_num_layers else None
    rope = getattr(hf_config, "rope_parameters", None) or {}
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=int(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000))),
        mtp_block_spec=mtp_spec,
    )
    if settings.token_dispatcher == "device":
        from miles_envs.trainer.megatron.dispatch import install_device_dispatch

        install_device_dispatch(model)
    if torch.cuda.is_available():  # the local spec's norms are plain torch modules, made on the CPU
        model.cuda(torch.cuda.current_device())
    return model
