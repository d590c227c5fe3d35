"""Engine and renderer construction from command-line specs (shared by rollout, train and bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_TOKENIZER = "qwen3"


def build_renderer(engine_spec: str, tokenizer: str | None):
    """The chat renderer for the engine's tokenizer: an embedded model's own, else ``tokenizer``."""
    from miles_envs.chat import ChatRenderer
    from miles_envs.tokenizers import load_tokenizer

    if tokenizer is None and engine_spec.startswith("embedded:"):
        tokenizer = engine_spec.split(":", 1)[1]
    return ChatRenderer(load_tokenizer(tokenizer or DEFAULT_TOKENIZER))


def build_engine(engine_spec: str, tokenizer: Any, script: Path | None = None):
    from miles_envs.agents.factory import make_engine

    replies = None
    if script is not None:
        replies = json.loads(Path(script).read_text())
        if not isinstance(replies, list) or not replies:
            raise ValueError(f"{script}: the script must be a non-empty JSON list of reply strings")
    return make_engine(engine_spec, tokenizer=tokenizer, replies=replies)
