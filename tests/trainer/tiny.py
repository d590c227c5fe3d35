"""Tiny random-weight models and hand-built trajectories for the trainer tests."""

import numpy as np
import torch

from miles_envs.trajectory import Trajectory, expert_dtype

VOCAB = 512


def tiny_moe(seed: int = 0, **overrides):
    """A 2-layer Qwen3-MoE with random weights (8 experts, top-2), small enough for CPU tests."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**settings)).eval()


def make_trajectory(prompt, response, *, mask=None, logprobs=None, reward=0.0, group_id="g", routed=None, **kw):
    mask = list(mask) if mask is not None else [1] * len(response)
    logprobs = list(logprobs) if logprobs is not None else [-1.0 if m else 0.0 for m in mask]
    return Trajectory(
        prompt_ids=list(prompt),
        response_ids=list(response),
        loss_mask=mask,
        logprobs=logprobs,
        reward=reward,
        group_id=group_id,
        routed_experts=routed,
        **kw,
    ).validate()


@torch.no_grad()
def rollout_routing(model, tokens: list[int]) -> np.ndarray:
    """The engine-side routing trace of ``tokens[:-1]`` ([T, num_hidden_layers, topk], as SGLang lays it out)."""
    from miles_envs.models.routing import RoutingRecorder

    recorder = RoutingRecorder(model)
    with recorder.record():
        model(input_ids=torch.tensor([tokens[:-1]]), use_cache=False)
    routing = recorder.take(1, len(tokens) - 1)[0].numpy()
    return routing.astype(expert_dtype(recorder.routers[next(iter(recorder.routers))].num_experts))
