"""Load a checkpoint folder for inference: main model, MTP layers, tokenizer, stop ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoadedCheckpoint:
    path: Path
    model: Any
    tokenizer: Any
    mtp: Any | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    context_length: int = 4096


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eos_ids(path: Path, config) -> list[int]:
    ids: list[int] = []
    sources = [getattr(config, "eos_token_id", None)]
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        sources.insert(0, json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist: create one with `miles-envs init-model {path}`")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a transformers checkpoint folder")
    return path


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Model in eval mode on ``device`` (GPU when present), with its MTP layers when stored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miles_envs.models.mtp import load_mtp

    path = check_checkpoint_dir(path)
    device = torch.device(device) if device is not None else default_device()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = model.config
    return LoadedCheckpoint(
        path=path,
        model=model,
        tokenizer=tokenizer,
        mtp=load_mtp(model, path),
        eos_token_ids=_eos_ids(path, config),
        context_length=int(getattr(config, "max_position_embeddings", 4096)),
    )
