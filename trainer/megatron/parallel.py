"""Process groups and megatron's parallel state for one trainer process (one GPU per rank).

Under ``torchrun`` (or Ray trainer ranks) ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` come from the
environment; a plain process is a world of one on 127.0.0.1. ``MegatronTrainer`` calls
``ensure_parallel`` when it is built, so every entry point (the CLI, scripts, tests) gets the same
groups without setting them up itself.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from miles_envs.trainer.megatron.model import MegatronSettings


class MegatronUnavailable(RuntimeError):
    """megatron's parallel state cannot be set up in this process (no CUDA device, wrong sizes)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(settings: MegatronSettings, seed: int = 0) -> None:
    """NCCL process group, megatron's TP/EP groups and its CUDA RNG tracker (idempotent)."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        raise MegatronUnavailable(
            "the megatron backend needs a CUDA device (megatron-core's process groups, DDP and optimizer run on "
            "CUDA/NCCL) and none is visible here: use the torch backend (--backend torch) on CPU"
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    model_parallel = settings.tensor_parallel * settings.expert_parallel
    if world % settings.tensor_parallel or world % settings.expert_parallel:
        raise MegatronUnavailable(
            f"tensor_parallel={settings.tensor_parallel} x expert_parallel={settings.expert_parallel} does not divide "
            f"the {world} trainer ranks: start {model_parallel} (or a multiple) ranks with torchrun --nproc-per-node"
        )
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl", rank=int(os.environ.get("RANK", 0)), world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=settings.tensor_parallel, expert_model_parallel_size=settings.expert_parallel
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ensure_parallel(settings: MegatronSettings, seed: int = 0) -> None:
    """Use the parallel state already set up in this process, or set it up (``init_parallel``).

    An existing state must have the sizes ``settings`` asks for: a model built for other sizes would
    shard its weights wrongly.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(settings, seed)
        return
    have = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_expert_model_parallel_world_size())
    want = (settings.tensor_parallel, settings.expert_parallel)
    if have != want:
        raise MegatronUnavailable(
            f"megatron's parallel state is already set up with tensor_parallel={have[0]}, expert_parallel={have[1]} "
            f"but the trainer asks for {want[0]}, {want[1]}: call parallel_state.destroy_model_parallel() first"
        )
