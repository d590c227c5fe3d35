"""The settings of one training run (what ``miles-envs train`` parses), checked before any work.

Also the backend choice: the trainer class behind ``--backend`` and its config from the settings.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

EVAL_SEED = 1_000_000  # held-out env seeds: training uses seed + step * tasks_per_step + i
DEMO_SEED = 2_000_000  # warm-start demonstration seeds
ADAPTER_NAME = "policy"
WARMUP_PHASE, RL_PHASE = "before_warmup", "rl"  # eval.jsonl phases: the model as given, then RL steps
BACKENDS = ("torch", "megatron")


@dataclass
class TrainSettings:
    env_id: str
    model: Path
    out: Path
    steps: int
    backend: str = "torch"
    algo: str = "grpo"
    r3: bool = False
    mtp_sft: bool = False
    mtp_lr: float | None = None
    lora_rank: int = 0
    lr: float = 1e-5
    tasks_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 256
    temperature: float = 1.0
    sft_warmup: int = 0
    sft_lr: float = 1e-3
    sft_batch: int = 16
    sft_episodes: int = 256
    eval_every: int = 0
    eval_tasks: int = 32
    checkpoint_every: int = 10
    engine: str | None = None  # None: the embedded engine on --model; else sglang://HOST:PORT
    draft_tokens: int = 0
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False  # bit-for-bit repeatable runs (pipeline.engines.DETERMINISTIC_ENGINE)
    log: tuple[str, ...] = ("jsonl",)
    ray_workers: int = 0  # > 0: rollouts on Ray actors, each with its own embedded engine
    async_mode: bool = False  # rollouts keep running while the trainer trains (pipeline.async_run)
    max_staleness: int | None = None  # async: versions a trajectory may lag the trainer (default 1)
    on_stale: str = "drop"
    oversample: float = 1.0
    max_buffer_tokens: int | None = None
    staleness_decay: float = 1.0
    keep_checkpoints: int = 2
    keep_serving: int = 2


class BackendUnavailable(RuntimeError):
    """The chosen training backend cannot be imported here."""


DEFAULT_MAX_STALENESS = 1


def check_settings(settings: TrainSettings) -> None:
    """Configuration mistakes, found before anything is loaded or written."""
    model = Path(settings.model)
    if not model.is_dir() or not (model / "config.json").is_file():
        what = "does not exist" if not model.exists() else "is not a model folder (no config.json)"
        raise FileNotFoundError(
            f"--model {model} {what}: give an HF checkpoint folder, e.g. one made by "
            f"`miles-envs init-model {model} --arch qwen3 --size tiny --tokenizer qwen3`"
        )
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown backend {settings.backend!r}: choose one of {', '.join(BACKENDS)}")
    if settings.backend == "megatron":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("--backend megatron trains on CUDA GPUs and none is visible here: use --backend torch")
        if settings.sft_warmup:
            raise ValueError(
                "--sft-warmup trains with the torch backend's own optimizer, which the megatron backend's weights are not in: "
                "warm-start with --backend torch (e.g. --steps 1), then pass a checkpoint's model folder "
                "(OUT/checkpoints/step_N/model) to --backend megatron as --model"
            )
    if settings.deterministic:
        given = {"--engine": settings.engine is not None, "--ray": bool(settings.ray_workers), "--async": settings.async_mode,
                 "--draft-tokens": bool(settings.draft_tokens)}
        if any(given.values()):
            raise ValueError(
                f"--deterministic repeats a run on the embedded engine's one-request-at-a-time schedule, which "
                f"{', '.join(k for k, v in given.items() if v)} replace: drop one or the other (an SGLang server has its "
                "own --enable-deterministic-inference)"
            )
    if not 0.0 < settings.staleness_decay <= 1.0:
        raise ValueError(f"--staleness-decay {settings.staleness_decay}: must be in (0, 1] (1: stale tokens weigh like fresh ones)")
    if settings.async_mode:
        from miles_envs.pipeline.async_run import LiveUpdateUnsupported

        async_settings(settings).validate()
        if settings.engine is not None and settings.lora_rank:
            raise LiveUpdateUnsupported(
                "--async pushes weights while episodes run, but an SGLang server swaps LoRA adapters by unloading and "
                "reloading them, which fails the requests in flight: drop --lora or --async"
            )
    else:
        given = {"--max-staleness": settings.max_staleness is not None, "--on-stale": settings.on_stale != "drop",
                 "--oversample": settings.oversample != 1.0, "--buffer-tokens": settings.max_buffer_tokens is not None}
        if any(given.values()):
            raise ValueError(f"{', '.join(k for k, v in given.items() if v)} set the asynchronous schedule: add --async")


def async_settings(settings: TrainSettings):
    from miles_envs.pipeline.async_run import AsyncSettings

    staleness = DEFAULT_MAX_STALENESS if settings.max_staleness is None else settings.max_staleness
    if staleness < 0:
        raise ValueError(f"--max-staleness {staleness}: give a whole number of versions >= 0 (1-4 is the usual range)")
    return AsyncSettings(staleness, settings.on_stale, settings.oversample, settings.max_buffer_tokens)


def load_backend(name: str) -> type:
    """The trainer class of backend ``name``; megatron needs megatron-core (and a GPU)."""
    if name == "torch":
        from miles_envs.trainer import Trainer

        return Trainer
    if name == "megatron":
        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            raise BackendUnavailable(
                "--backend megatron needs megatron-core, which is not installed: pip install 'miles-envs[megatron]' "
                "on a GPU machine, or use --backend torch"
            )
        return importlib.import_module("miles_envs.trainer.megatron.backend").MegatronTrainer
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def trainer_config(settings: TrainSettings):
    from miles_envs.trainer import TrainerConfig

    return TrainerConfig(
        algo=settings.algo, lr=settings.lr, r3=settings.r3, mtp_sft=settings.mtp_sft, mtp_lr=settings.mtp_lr,
        lora_rank=settings.lora_rank, staleness_decay=settings.staleness_decay,
        temperature=settings.temperature, device=settings.device, seed=settings.seed,
    )
