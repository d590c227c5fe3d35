"""The ``miles-envs train`` run: backend and engine wiring, warm start, RL chunks, eval, summary.

Layout of ``OUT``: ``checkpoints/`` (resume point; ``step_000000`` is the warm-started model),
``metrics.jsonl`` (one line per RL step, written by the trainer loop), ``sft.jsonl`` and
``eval.jsonl`` (warm-start steps and evaluations), ``tensorboard/`` when asked, and
``metrics.json`` (the run's summary, rewritten at the end of every run). A rerun with the same
``OUT`` resumes from the newest checkpoint and skips the warm start.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from miles_envs.agents.engine import SamplingParams
from miles_envs.loop import LoopConfig, rollout

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
    log: tuple[str, ...] = ("jsonl",)
    ray_workers: int = 0  # > 0: rollouts on Ray actors, each with its own embedded engine


class Reporter(Protocol):
    """What the run tells the progress display."""

    def sft_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def train_step(self, metrics: dict[str, float]) -> None: ...

    def evaluated(self, step: int, reward: float, phase: str) -> None: ...


class BackendUnavailable(RuntimeError):
    """The chosen training backend cannot be imported here."""


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
        lora_rank=settings.lora_rank,
        temperature=settings.temperature, device=settings.device, seed=settings.seed,
    )


class SyncedEngine:
    """The rollout engine with the trainer's weight sync in the form this engine takes weights.

    The trainer loop calls ``update_weights(trainer.state_dict(), version=...)``; ``push`` turns
    that into an in-process load, an adapter update, or a checkpoint folder the server reloads.
    """

    def __init__(self, engine: Any, push: Callable[[Any, Any, str | None], Any]) -> None:
        self.engine, self._push = engine, push

    async def generate(self, *args: Any, **kwargs: Any):
        return await self.engine.generate(*args, **kwargs)

    async def update_weights(self, source: Any, *, version: str | None = None) -> None:
        await self._push(self.engine, source, version)

    async def abort(self, rid: str | None = None) -> None:
        await self.engine.abort(rid)

    async def health(self) -> bool:
        return await self.engine.health()

    async def close(self) -> None:
        await self.engine.close()


async def build_engine(settings: TrainSettings, trainer: Any) -> SyncedEngine:
    """The embedded engine on ``--model`` (adapter served by name under LoRA), or an SGLang server
    reloading checkpoints that this run writes under ``OUT/serving``."""
    lora = settings.lora_rank > 0
    if settings.engine is None:
        from miles_envs.agents.embedded import EmbeddedEngine

        engine = EmbeddedEngine.from_path(settings.model, device=trainer.device, draft_tokens=settings.draft_tokens)
        if lora:
            from miles_envs.trainer.lora import save_adapter

            await engine.load_lora_adapter(ADAPTER_NAME, save_adapter(trainer.model, settings.out / "serving" / "adapter"))

            async def push(engine, source, version):
                await engine.update_weights(source, version=version, lora=ADAPTER_NAME)
        else:

            async def push(engine, source, version):
                await engine.update_weights(source, version=version)

        return SyncedEngine(engine, push)

    from miles_envs.agents.factory import make_engine

    if not hasattr(trainer.model, "save_pretrained"):
        raise ValueError(f"--engine {settings.engine} reloads HF checkpoints, which only --backend torch writes")
    serving = settings.out / "serving"
    adapter_loaded = False

    async def push_to_disk(engine, _source, version):
        nonlocal adapter_loaded
        folder = serving / (version or "latest")
        trainer.model.save_pretrained(folder, safe_serialization=True)
        if not lora:
            await engine.update_weights(str(folder), version=version)
            return
        if adapter_loaded:
            await engine.unload_lora_adapter(ADAPTER_NAME)
        await engine.load_lora_adapter(ADAPTER_NAME, str(folder))
        adapter_loaded = True

    return SyncedEngine(make_engine(settings.engine), push_to_disk)


def ray_rollouts(settings: TrainSettings, engine: SyncedEngine) -> tuple[SyncedEngine, Callable[..., Any]]:
    """Rollouts on ``settings.ray_workers`` Ray actors, each with its own embedded engine on ``--model``.

    Returns the engine to sync (the local one, kept for eval, plus every worker's) and the
    ``collect`` function the trainer loop calls instead of its in-process rollout.
    """
    if settings.engine is not None or settings.lora_rank:
        raise ValueError("--ray runs embedded engines on the workers: drop --engine and --lora")
    import asyncio
    import functools

    import ray

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.cli.wiring import build_renderer
    from miles_envs.distributed import distributed_rollout, start_rollout_workers

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, settings.ray_workers), include_dashboard=False, log_to_driver=False)
    workers = start_rollout_workers(
        settings.ray_workers,
        functools.partial(EmbeddedEngine.from_path, str(settings.model), device="cpu"),
        functools.partial(build_renderer, f"embedded:{settings.model}", None),
    )
    local = engine

    async def push(_engine: Any, source: Any, version: str | None) -> None:
        shared = ray.put(source)
        await asyncio.gather(local.update_weights(source, version=version), *(w.update_weights.remote(shared, version) for w in workers))

    async def collect(n: int, group_size: int, config: LoopConfig, seed: int):
        return await distributed_rollout(workers, settings.env_id, n=n, group_size=group_size, config=config, seed=seed)

    return SyncedEngine(local, push), collect


async def evaluate(settings: TrainSettings, engine: Any, renderer: Any) -> float:
    """Mean reward of greedy episodes on ``eval_tasks`` held-out seeds."""
    config = LoopConfig(
        sampling=SamplingParams(temperature=0.0, max_new_tokens=settings.max_new_tokens),
        lora=ADAPTER_NAME if settings.lora_rank else None,
    )
    rewards = [
        t.reward
        async for t in rollout(settings.env_id, engine, renderer, n=settings.eval_tasks, config=config, seed=EVAL_SEED)
    ]
    return sum(rewards) / len(rewards)


class RunLog:
    """The run's JSON-lines files and the optional TensorBoard / W&B sinks."""

    def __init__(self, out: Path, log: tuple[str, ...]) -> None:
        from miles_envs.logging_sinks import JsonSink, open_sinks

        self.sft = JsonSink(out / "sft.jsonl")
        self.eval = JsonSink(out / "eval.jsonl")
        specs = [spec for spec in log if spec not in ("json", "jsonl")]
        specs = [f"tensorboard:{out / 'tensorboard'}" if spec == "tensorboard" else spec for spec in specs]
        self.dashboards = open_sinks(specs)

    def close(self) -> None:
        for sink in (self.sft, self.eval, self.dashboards):
            sink.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


async def run_training(settings: TrainSettings, reporter: Reporter) -> dict[str, Any]:
    """Warm start (fresh runs), then RL in chunks of ``eval_every`` steps with an eval after each."""
    from miles_envs.cli.wiring import build_renderer
    from miles_envs.registry import spec
    from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from miles_envs.trainer.loop import train

    spec(settings.env_id)  # unknown env ids fail before any model loads
    started = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    trainer = load_backend(settings.backend).from_pretrained(str(settings.model), trainer_config(settings))
    renderer = build_renderer(f"embedded:{settings.model}", None)
    resume = latest_checkpoint(out / "checkpoints")
    if resume is not None:
        load_checkpoint(trainer, resume)
    engine = await build_engine(settings, trainer)
    collect = None
    if settings.ray_workers:
        engine, collect = ray_rollouts(settings, engine)
    log = RunLog(out, settings.log)
    loop_config = LoopConfig(
        sampling=SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens, seed=settings.seed),
        lora=ADAPTER_NAME if settings.lora_rank else None,
    )

    async def eval_now(phase: str = RL_PHASE) -> None:
        reward = await evaluate(settings, engine, renderer)
        log.eval.log({"eval/reward_mean": reward, "phase": phase}, trainer.step)
        log.dashboards.log({f"eval/reward_mean_{phase}": reward}, trainer.step)
        reporter.evaluated(trainer.step, reward, phase)

    def on_train_step(metrics: dict[str, float]) -> None:
        log.dashboards.log(metrics, trainer.step)
        reporter.train_step(metrics)

    try:
        await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
        if resume is None and settings.sft_warmup:
            await warm_start_run(settings, trainer, renderer, log, reporter, eval_now if settings.eval_every else None)
            save_checkpoint(trainer, out / "checkpoints")
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
        evaluated = {int(e["step"]) for e in read_jsonl(out / "eval.jsonl") if e["phase"] == RL_PHASE}
        if settings.eval_every and trainer.step not in evaluated:
            await eval_now()
        while trainer.step < settings.steps:
            chunk_end = settings.steps
            if settings.eval_every:
                chunk_end = min(settings.steps, (trainer.step // settings.eval_every + 1) * settings.eval_every)
            await train(
                settings.env_id, engine, trainer, chunk_end, renderer=renderer, tasks_per_step=settings.tasks_per_step,
                group_size=settings.group_size, loop_config=loop_config, out_dir=out,
                checkpoint_every=settings.checkpoint_every, seed=settings.seed, on_step=on_train_step, collect=collect,
            )
            if settings.eval_every:
                await eval_now()
    finally:
        log.close()
        await engine.close()
    return write_summary(settings, time.perf_counter() - started)


async def warm_start_run(settings, trainer, renderer, log: RunLog, reporter: Reporter, eval_now) -> None:
    from miles_envs.trainer.sft import collect_demonstrations, warm_start

    if eval_now is not None:
        await eval_now(WARMUP_PHASE)  # the model as given, before the warm start
    seeds = range(DEMO_SEED, DEMO_SEED + settings.sft_episodes)
    demonstrations = await collect_demonstrations(settings.env_id, renderer, seeds, max_new_tokens=settings.max_new_tokens)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        log.sft.log(metrics, step)
        log.dashboards.log(metrics, step)  # sft/* tags: their own curve
        reporter.sft_step(step, metrics)

    warm_start(trainer, demonstrations, settings.sft_warmup, batch_size=settings.sft_batch, lr=settings.sft_lr, on_step=on_step)


def write_summary(settings: TrainSettings, wall_s: float) -> dict[str, Any]:
    """``OUT/metrics.json``: settings, eval curve, first/last training rewards, warm-start result."""
    out = settings.out
    evals = read_jsonl(out / "eval.jsonl")
    rl_evals = [{"step": int(e["step"]), "reward_mean": e["eval/reward_mean"]} for e in evals if e["phase"] == RL_PHASE]
    before = [e["eval/reward_mean"] for e in evals if e["phase"] == WARMUP_PHASE]
    # a step redone after a kill appears twice in metrics.jsonl: keep its last record
    steps = sorted({int(m["step"]): m for m in read_jsonl(out / "metrics.jsonl")}.items())
    sft = read_jsonl(out / "sft.jsonl")
    summary: dict[str, Any] = {
        "env_id": settings.env_id,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "steps_done": steps[-1][0] if steps else 0,
        "wall_s_this_run": round(wall_s, 1),
        "eval_reward_before_warmup": before[0] if before else None,
        "eval_reward_rl_start": rl_evals[0]["reward_mean"] if rl_evals else None,
        "eval_reward_end": rl_evals[-1]["reward_mean"] if rl_evals else None,
        "eval": rl_evals,
        "train_reward_first": steps[0][1]["reward_mean"] if steps else None,
        "train_reward_last": steps[-1][1]["reward_mean"] if steps else None,
        "sft_loss_last": sft[-1]["sft/loss"] if sft else None,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
