"""Test-only shim that lets megatron-core run tiny models on CPU (gloo, one process).

megatron-core assumes CUDA: parameters are placed with ``torch.cuda.current_device()``, and the
CUDA RNG tracker snapshots CUDA generator state. Here ``current_device`` answers ``"cpu"`` and the
tracker's fork is a plain no-op context (dropouts are 0 in these tests, so no random stream is
consumed). The backend's own code — model building from HF configs, weight conversion, replay
feeding and the MTP loss — then runs unchanged. This module is never imported by the product.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CpuRngTracker:
    """Stands in for megatron's CUDA RNG tracker: forks are no-ops (all dropouts are 0)."""

    def fork(self, name: str = "model-parallel-rng"):
        return contextlib.nullcontext()

    def add(self, name: str, seed: int) -> None:
        return None

    def reset(self) -> None:
        return None

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        return None

    def is_initialized(self) -> bool:
        return True


@contextlib.contextmanager
def cpu_megatron(seed: int = 0, tensor_parallel: int = 1, expert_parallel: int = 1):
    """megatron's parallel state on CPU over gloo, torn down after: a one-rank group unless the
    process already joined one (``torchrun`` with gloo, for TP/EP across processes)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    patches = contextlib.ExitStack()
    patches.enter_context(_patch(torch.cuda, "current_device", lambda: "cpu"))
    patches.enter_context(_patch(torch._dynamo.config, "disable", True))  # 0.19 compiles router code for CUDA
    tracker = _CpuRngTracker()
    patches.enter_context(_patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", tracker))
    patches.enter_context(_patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True))
    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_parallel, expert_model_parallel_size=expert_parallel)
        torch.manual_seed(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
        patches.close()


class _HostStream:
    """Stands in for the CUDA stream megatron's alltoall dispatcher copies token counts on: on CPU the
    counts are host tensors already, so waits and events are no-ops."""

    def wait_stream(self, _other) -> None:
        return None

    def record_event(self):
        return self

    def synchronize(self) -> None:
        return None


@contextlib.contextmanager
def cpu_alltoall():
    """Within (and inside ``cpu_megatron``): megatron's alltoall dispatcher builds and runs on CPU."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    stream = _HostStream()
    with contextlib.ExitStack() as patches:
        patches.enter_context(_patch(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", stream))
        patches.enter_context(_patch(torch.cuda, "current_stream", lambda *_: stream))
        patches.enter_context(_patch(torch.cuda, "stream", lambda _s: contextlib.nullcontext()))
        yield


@contextlib.contextmanager
def _patch(owner, name: str, value):
    missing = object()
    old = getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


class _TorchStep:
    """CPU stand-in for megatron's DDP + optimizer (which allocate on CUDA): AdamW with clipping."""

    def __init__(self, params, lr: float, weight_decay: float, max_grad_norm: float) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=True)  # no host read per parameter
        self.max_grad_norm = max_grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> float:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        return grad_norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()


@contextlib.contextmanager
def cpu_optimizer():
    """Within: ``MegatronTrainer`` trains its ``GPTModel`` unwrapped with torch AdamW."""
    from miles_envs.trainer.megatron import backend

    def wrap(gpt_model, cfg, settings):
        return gpt_model, _TorchStep(gpt_model.parameters(), cfg.lr, cfg.weight_decay, cfg.max_grad_norm)

    with _patch(backend, "_wrap_for_training", wrap):
        yield
