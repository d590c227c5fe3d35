"""Tiny random-init checkpoints shared by the model and embedded-engine tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles_envs.models.factory import init_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``make(arch, mtp)`` -> folder of a tiny fp32 checkpoint with the qwen3 tokenizer."""
    made: dict[tuple[str, int], Path] = {}

    def make(arch: str = "qwen3-moe", mtp: int = 0) -> Path:
        if (arch, mtp) not in made:
            made[arch, mtp] = init_model(tmp_path_factory.mktemp(f"{arch}-mtp{mtp}"), arch=arch, size="tiny", mtp=mtp)
        return made[arch, mtp]

    return make
