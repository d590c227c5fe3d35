"""LoRA adapters with peft: only adapter weights train; saved in the layout SGLang's LoRA loader reads.

SGLang (``--lora-paths`` / ``/load_lora_adapter``) loads a peft directory: ``adapter_config.json``
plus ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A/B.weight`` keys. The
default targets are the attention and dense-MLP projections, which every SGLang LoRA backend
supports; MoE expert weights stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; base weights are frozen by peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - exercised only without the [train] extra
        raise ImportError("LoRA needs peft: pip install 'miles-envs[train]'") from exc
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved key names (what goes into adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
