"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

Layout of ``ROOT/step_000042/``: ``model/`` (``save_pretrained`` output: a servable HF model, or
for LoRA the peft adapter folder SGLang loads; MTP layers in ``model/mtp.safetensors`` under their
DeepSeek-V3 on-disk names), ``optimizer.pt``, ``rng.pt``, ``trainer_state.json`` and, when the run
has state of its own (the rollout buffer's position under asynchronous training), ``run_state.json``
(written in the same rename, so it always matches the weights). ``ROOT/latest`` names the newest
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from miles_envs.trainer.lora import is_peft_model
from miles_envs.trainer.torch_backend import Trainer

LATEST = "latest"
RUN_STATE = "run_state.json"


def save_checkpoint(trainer: Trainer, root: str | Path, *, keep: int = 2, run_state: dict[str, Any] | None = None) -> Path:
    """Write the trainer's state (and ``run_state``) under ``root``, keep the newest ``keep``
    checkpoints (0: all), and return the checkpoint folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer.step:06d}"
    staging = root / f".staging_{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if hasattr(trainer, "save_model_files"):  # a backend whose model is not a transformers model
        trainer.save_model_files(staging / "model")
    else:
        _save_transformers_model(trainer, staging / "model")
    torch.save(trainer.optimizer.state_dict(), staging / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, staging / "rng.pt")
    state = {"step": trainer.step, "config": trainer.config.to_dict(), "lora": is_peft_model(trainer.model)}
    (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if run_state is not None:
        (staging / RUN_STATE).write_text(json.dumps(run_state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_transformers_model(trainer: Trainer, folder: Path) -> None:
    trainer.model.save_pretrained(folder, safe_serialization=True)
    if trainer.mtp is not None:
        from safetensors.torch import save_file

        from miles_envs.models.mtp import mtp_checkpoint_tensors

        tensors = mtp_checkpoint_tensors(trainer.mtp, trainer.base_model)
        save_file(tensors, str(folder / "mtp.safetensors"), metadata={"format": "pt"})


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None`` for a fresh run."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was written at, read without loading any weights."""
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])


def load_run_state(path: str | Path) -> dict[str, Any] | None:
    """The ``run_state`` saved with a checkpoint, or ``None``."""
    file = Path(path) / RUN_STATE
    return json.loads(file.read_text()) if file.is_file() else None


def load_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore weights, optimizer, RNG and step into a trainer built with the same model and config."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state["lora"] != is_peft_model(trainer.model):
        raise ValueError(f"{path} was saved {'with' if state['lora'] else 'without'} LoRA; build the trainer the same way")
    if hasattr(trainer, "load_model_files"):
        trainer.load_model_files(path / "model")
    else:
        _load_transformers_model(trainer, path, state["lora"])
    configured = [group["lr"] for group in getattr(trainer.optimizer, "param_groups", [])]
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=trainer.device, weights_only=False))
    for group, lr in zip(getattr(trainer.optimizer, "param_groups", []), configured):
        group["lr"] = lr  # moments come from the checkpoint; the rates are this run's (a resume may change --lr)
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    trainer.step = int(state["step"])


def _load_transformers_model(trainer: Trainer, path: Path, lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model, load_file(path / "model" / "adapter_model.safetensors"))
    else:
        saved = type(trainer.model).from_pretrained(path / "model", dtype=next(trainer.model.parameters()).dtype)
        trainer.model.load_state_dict(saved.state_dict())
    if trainer.mtp is not None:
        from miles_envs.models.mtp import load_mtp_tensors, read_mtp_tensors

        tensors = read_mtp_tensors(path / "model", trainer.base_model.config.num_hidden_layers)
        if not tensors:
            raise ValueError(f"{path} has no MTP layers but the trainer has; build the trainer the same way")
        load_mtp_tensors(trainer.mtp, trainer.base_model, tensors)
