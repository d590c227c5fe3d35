"""Tiny HF models for the megatron backend tests (2I != H, so a transposed expert weight fails)."""

import torch

VOCAB = 300


def tiny_qwen3_moe(mtp: int = 1, seed: int = 0, tie: bool = False, layers: int | None = None, arch: str = "qwen3-moe"):
    """``(hf_config, model, mtp_stack or None)`` with random weights (MTP layers not zero); ``arch="qwen3"``
    for the dense model of the same size."""
    from transformers import AutoModelForCausalLM

    from miles_envs.models.factory import build_config
    from miles_envs.models.mtp import build_mtp

    config = build_config(arch, "tiny", VOCAB, mtp=mtp)
    config.moe_intermediate_size = 24
    if layers is not None:
        config.num_hidden_layers = layers
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stack = None
    if mtp:
        stack = build_mtp(model, mtp)
        with torch.no_grad():
            for p in stack.layers.parameters():
                p.normal_(0, 0.1) if p.dim() > 1 else p.normal_(1, 0.1)
    return config, model, stack


def replayed_steps(variants: dict, data) -> dict:
    """Per named ``MegatronSettings``, a trainer built from one tiny MoE (the caller holds the CPU shims):
    its replayed forward on the packed episodes, one R3 + MTP-SFT GRPO step's metrics, the weights after."""
    from miles_envs.trainer.batch import pack
    from miles_envs.trainer.config import TrainerConfig
    from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
    from tests.trainer.tiny import make_trajectory, rollout_routing

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    trajectories = [
        make_trajectory(p, r, reward=float(i % 2), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(data)
    ]
    (batch,) = pack(trajectories, [0.0] * len(data), [1.0] * len(data), max_row_tokens=64)
    results = {}
    for name, settings in variants.items():
        trainer = MegatronTrainer(
            config, hf_state_of(model, mtp), TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, r3=True, mtp_sft=True), settings
        )
        with torch.no_grad():
            forward = trainer.forward(batch, replay=True)
        results[name] = (forward, trainer.train_step(trajectories), trainer.state_dict())
    return results
