"""HF checkpoint folders from HF-named weights (``MegatronTrainer.state_dict()``).

The folder is what ``transformers`` writes (config + safetensors in its on-disk format), plus the
MTP layers in the DeepSeek NextN layout (``mtp.safetensors``): the embedded engine loads it with
``EmbeddedEngine.from_path`` and SGLang with ``/update_weights_from_disk``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_hf_checkpoint(weights: dict[str, torch.Tensor], hf_config, path: str | Path, *, tokenizer_from: str | Path | None = None) -> Path:
    """Write ``weights`` (main model + ``mtp.*``) as an HF folder; copy tokenizer files when given."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from miles_envs.models.mtp import build_mtp, mtp_checkpoint_tensors, mtp_layer_count

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    dtype = next(iter(main.values())).dtype
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.load_state_dict(main, strict=not hf_config.tie_word_embeddings)
    model.save_pretrained(path)
    depth = mtp_layer_count(hf_config)
    if depth:
        mtp = build_mtp(model, depth)
        missing, unexpected = mtp.load_state_dict({k[len("mtp.") :]: v for k, v in weights.items() if k.startswith("mtp.")}, strict=False)
        if unexpected or any(not k.startswith(("embed_tokens.", "shared_head.", "rotary_emb.")) for k in missing):
            raise ValueError(f"MTP weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
        save_file(mtp_checkpoint_tensors(mtp, model), str(path / "mtp.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        for file in Path(tokenizer_from).iterdir():
            if file.is_file() and file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                shutil.copy2(file, path / file.name)
    return path
