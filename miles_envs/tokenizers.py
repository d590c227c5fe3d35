"""Locating the real tokenizer files shipped beside the project (``../shared/tokenizers``)."""

from __future__ import annotations

import os
from pathlib import Path

KNOWN = ("qwen3", "qwen2_5", "llama3", "deepseek_v3")


def tokenizers_root() -> Path:
    """``$MILES_ENVS_TOKENIZERS`` or the ``shared/tokenizers`` folder beside the checkout."""
    env = os.environ.get("MILES_ENVS_TOKENIZERS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "tokenizers"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "tokenizer files not found: set MILES_ENVS_TOKENIZERS to a folder holding qwen3/, qwen2_5/, llama3/, deepseek_v3/"
    )


def tokenizer_path(name: str) -> Path:
    if name not in KNOWN:
        raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(KNOWN)}")
    return tokenizers_root() / name


def load_tokenizer(name_or_path: str):
    """A transformers tokenizer from a known short name or a directory (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = tokenizer_path(name_or_path) if name_or_path in KNOWN else Path(name_or_path)
    return AutoTokenizer.from_pretrained(str(path))
