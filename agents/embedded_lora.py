"""LoRA adapters served by name without merging them into the base weights.

Each adapter is a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``, the layout
``miles_envs.trainer.lora`` saves and SGLang's ``/load_lora_adapter`` reads) or the same tensors as
a state dict. The base model stays untouched: every adapted ``nn.Linear`` gets one forward hook that
adds ``scaling * B(A(x))`` to the rows of the batch whose request named that adapter, so requests
with different adapters (or none) share one batched forward, as in S-LoRA / SGLang.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class Adapter:
    name: str
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)


def scaling_of(config: Mapping[str, Any]) -> float:
    """peft's scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); DoRA has no unmerged form here."""
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not served by the embedded engine: train a plain LoRA adapter")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter config, tensors) of a peft adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(peft's save_pretrained writes both)"
        )
    return json.loads((folder / ADAPTER_CONFIG).read_text()), load_file(str(folder / ADAPTER_WEIGHTS))


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``A``)."""
    module = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if module.endswith(suffix):
                return module[: -len(suffix)], part
    raise ValueError(f"adapter tensor {key!r} is neither a lora_A nor a lora_B weight")


class LoraServer:
    """The adapters loaded into one model, and the hooks that apply them per batch row."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.adapters: dict[str, Adapter] = {}
        self._active: list[tuple[Adapter, torch.Tensor]] = []
        self._hooks: dict[str, Any] = {}

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Add (or replace) adapter ``name``; tensors use peft's saved key names."""
        self.adapters[name] = Adapter(name, scaling_of(config), self._pairs(name, tensors))
        self._sync_hooks()

    def update(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """New weights for a loaded adapter (same config); tensors use peft's saved key names."""
        adapter = self.get(name)
        pairs = self._pairs(name, tensors)
        missing = set(adapter.weights) - set(pairs)
        if missing:
            raise ValueError(f"update of LoRA adapter {name!r} lacks modules {sorted(missing)[:3]}: send the whole adapter")
        adapter.weights = pairs
        self._sync_hooks()

    def unload(self, name: str) -> None:
        self.get(name)
        del self.adapters[name]
        self._sync_hooks()

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {loaded}); load it first with load_lora_adapter")
        return self.adapters[name]

    @contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Apply adapter ``names[i]`` to batch row ``i`` (``None``: base model) during one forward."""
        device = next(self.model.parameters()).device
        self._active = [
            (self.adapters[name], torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
            for name in sorted({n for n in names if n is not None})
        ]
        try:
            yield
        finally:
            self._active = []

    def _pairs(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, part = _split_key(key)
            parts.setdefault(module, {})[part] = tensor
        pairs = {}
        for module, found in parts.items():
            linear = self.linears.get(module)
            if linear is None:
                raise ValueError(f"LoRA adapter {name!r} targets {module!r}, which is not a linear layer of the model")
            if set(found) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {name!r}: {module!r} needs both lora_A and lora_B")
            a, b = (found[p].to(linear.weight.device, linear.weight.dtype) for p in ("A", "B"))
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"LoRA adapter {name!r}: {module!r} shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                    f"a {linear.in_features}->{linear.out_features} layer"
                )
            pairs[module] = (a, b)
        return pairs

    def _sync_hooks(self) -> None:
        wanted = {module for adapter in self.adapters.values() for module in adapter.weights}
        for module in set(self._hooks) - wanted:
            self._hooks.pop(module).remove()
        for module in wanted - set(self._hooks):
            self._hooks[module] = self.linears[module].register_forward_hook(self._hook(module))

    def _hook(self, module: str):
        def add_delta(_linear: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            for adapter, rows in self._active:
                pair = adapter.weights.get(module)
                if pair is not None:
                    a, b = pair
                    output[rows] += adapter.scaling * ((inputs[0][rows] @ a.T) @ b.T)
            return output

        return add_delta
