"""Process groups and megatron's parallel state for one trainer process (one GPU per rank).

Under ``torchrun`` (or Ray trainer ranks) ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` come from the
environment; a plain process is a world of one on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from miles_envs.trainer.megatron.model import MegatronSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(settings: MegatronSettings, seed: int = 0) -> None:
    """NCCL process group, megatron's TP/EP groups and its CUDA RNG tracker (idempotent)."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        raise RuntimeError("the megatron backend needs a CUDA device; use the torch backend on CPU")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            "nccl", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1))
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=settings.tensor_parallel, expert_model_parallel_size=settings.expert_parallel
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
