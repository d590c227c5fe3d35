"""The weight-sync step: how a trainer's new weights reach the engines that roll out.

Each strategy builds the typed source (``miles_envs.weight_sync``) its engine accepts and labels it
with ``trainer.weight_version``, so every token sampled afterwards carries the version that made it.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from miles_envs.trajectory import version_number
from miles_envs.weight_sync import CheckpointFolder, Tensors


class WeightSync(Protocol):
    """Pushes ``trainer``'s current weights (``state_dict()``, ``weight_version``) to the engines."""

    async def push(self, trainer: Any) -> None: ...


class InProcess:
    """The trainer's tensors, handed to an engine in this process (the embedded engine).

    With ``lora``, the tensors are that served adapter's new weights.
    """

    def __init__(self, engine: Any, *, lora: str | None = None) -> None:
        self.engine, self.lora = engine, lora

    async def push(self, trainer: Any) -> None:
        extra = {} if self.lora is None else {"lora": self.lora}
        await self.engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version, **extra)


class ThroughFolder:
    """A checkpoint folder per version under ``serving``, which the engine (an SGLang server) reloads.

    ``save(folder)`` writes the trainer's weights there (an HF checkpoint, or a peft adapter under
    LoRA, which the server then swaps by unloading and reloading the adapter ``lora``). Only the
    newest ``keep`` folders stay.
    """

    def __init__(self, engine: Any, save: Callable[[Path], None], serving: Path, *, keep: int = 2, lora: str | None = None) -> None:
        self.engine, self.save, self.serving, self.keep, self.lora = engine, save, Path(serving), keep, lora
        self._adapter_loaded = False

    async def push(self, trainer: Any) -> None:
        version = trainer.weight_version
        folder = self.serving / (version or "latest")
        self.save(folder)
        if self.lora is None:
            await self.engine.update_weights(CheckpointFolder(folder), version=version)
        else:
            if self._adapter_loaded:
                await self.engine.unload_lora_adapter(self.lora)
            await self.engine.load_lora_adapter(self.lora, str(folder))
            self._adapter_loaded = True
        prune_serving(self.serving, self.keep)


class FanOut:
    """``local``'s push plus the same tensors to every rollout worker (Ray actors holding engines)."""

    def __init__(self, local: WeightSync, workers: Sequence[Any]) -> None:
        self.local, self.workers = local, list(workers)

    async def push(self, trainer: Any) -> None:
        import ray

        shared = ray.put(Tensors(trainer.state_dict()))
        version = trainer.weight_version
        await asyncio.gather(self.local.push(trainer), *(w.update_weights.remote(shared, version) for w in self.workers))


def prune_serving(serving: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``serving/step-N`` folders (the server has loaded the newest)."""
    folders = sorted((p for p in serving.glob("step-*") if p.is_dir()), key=lambda p: version_number(p.name) or 0)
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
