"""Random-init checkpoints of small Qwen3 / Qwen3-MoE / DeepSeek-V3 models for CPU runs and tests.

Hidden sizes are tiny so CPU forwards are fast; the vocabulary is the real tokenizer's size so
real chat templates and token ids work end to end. ``medium`` is the shape the GPU checks
pretrain (``bench/gpu/pretrain_moe.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ARCHS = ("qwen3-moe", "qwen3", "deepseek-v3")
SIZES = ("tiny", "small", "medium")
TOKENIZERS = ("qwen3", "qwen2_5", "llama3", "deepseek_v3")

_SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8, topk=2, ffn=128, moe_ffn=32),
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, experts=16, topk=4, ffn=512, moe_ffn=128),
    "medium": dict(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, experts=32, topk=4, ffn=1024, moe_ffn=256),
}


def _special_ids(tokenizer) -> tuple[int | None, list[int]]:
    """(bos, eos ids): the chat end-of-turn token first, then the tokenizer's own eos."""
    eos = []
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in eos:
            eos.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return tokenizer.bos_token_id, eos


def build_config(arch: str, size: str, vocab_size: int, *, mtp: int = 0, bos=None, eos=None, context: int = 4096):
    """A transformers config for ``arch`` at ``size`` (see ``_SHAPES``)."""
    from transformers import DeepseekV3Config, Qwen3Config, Qwen3MoeConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    s = _SHAPES[size]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype="float32",
    )
    if arch == "qwen3":
        config = Qwen3Config(num_hidden_layers=s["layers"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], **common)
    elif arch == "qwen3-moe":
        config = Qwen3MoeConfig(
            num_hidden_layers=s["layers"],
            num_key_value_heads=s["kv_heads"],
            head_dim=s["head_dim"],
            num_experts=s["experts"],
            num_experts_per_tok=s["topk"],
            moe_intermediate_size=s["moe_ffn"],
            norm_topk_prob=True,
            **common,
        )
    else:
        # One dense layer first, as in DeepSeek-V3 (its routing rows are zeros).
        config = DeepseekV3Config(
            num_hidden_layers=s["layers"] + 1,
            first_k_dense_replace=1,
            num_key_value_heads=s["heads"],
            n_routed_experts=s["experts"],
            num_experts_per_tok=s["topk"],
            n_group=2,
            topk_group=1,
            moe_intermediate_size=s["moe_ffn"],
            kv_lora_rank=s["head_dim"] * 2,
            q_lora_rank=None,
            qk_rope_head_dim=s["head_dim"] // 2,
            qk_nope_head_dim=s["head_dim"] // 2,
            v_head_dim=s["head_dim"],
            num_nextn_predict_layers=mtp,
            **common,
        )
    if mtp:
        config.num_nextn_predict_layers = mtp
        config.num_mtp_layers = mtp
        if getattr(config, "layer_types", None) is not None:
            config.mtp_layer_types = ["full_attention"] * mtp
    elif arch != "deepseek-v3":
        config.num_nextn_predict_layers = 0
    return config


def init_model(
    path: str | Path,
    *,
    arch: str = "qwen3-moe",
    size: str = "tiny",
    mtp: int = 0,
    tokenizer: str = "qwen3",
    seed: int = 0,
    context: int = 4096,
) -> Path:
    """Write a random-init checkpoint folder: config, safetensors (+ MTP layers), tokenizer, generation config."""
    from transformers import AutoModelForCausalLM

    from miles_envs.models.mtp import build_mtp
    from miles_envs.tokenizers import load_tokenizer

    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    bos, eos = _special_ids(tok)
    config = build_config(arch, size, len(tok), mtp=mtp, bos=bos, eos=eos, context=context)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    draft = build_mtp(model, mtp) if mtp else None
    meta = {"arch": arch, "size": size, "mtp": mtp, "tokenizer": tokenizer, "seed": seed}
    return save_folder(path, model, draft, tokenizer, meta)


def save_folder(path: str | Path, model, mtp, tokenizer: str, meta: dict) -> Path:
    """Write ``model`` (+ its MTP stack) as a checkpoint folder the engine and trainer load."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from miles_envs.models.mtp import mtp_checkpoint_tensors
    from miles_envs.tokenizers import tokenizer_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if mtp is not None:
        save_file(mtp_checkpoint_tensors(mtp, model), str(path / "mtp.safetensors"), metadata={"format": "pt"})
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=1.0, top_p=1.0).save_pretrained(path)
    for file in tokenizer_path(tokenizer).iterdir():
        if file.is_file():
            shutil.copy2(file, path / file.name)
    (path / "miles_envs_model.json").write_text(json.dumps(meta, indent=2))
    return path
