"""Trainer: trajectories -> packed batches -> GRPO-family updates, with R3 replay, MTP-SFT and LoRA."""

from miles_envs.trainer.batch import PackedBatch, pack
from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.torch_backend import Trainer

__all__ = ["PackedBatch", "Trainer", "TrainerConfig", "pack"]
