"""The ``miles-envs train`` run: backend and engine wiring, warm start, RL (synchronous or
asynchronous), eval, summary.

Layout of ``OUT``: ``checkpoints/`` (resume point; ``step_000000`` is the warm-started model; the
newest ``keep_checkpoints`` are kept), ``metrics.jsonl`` (one line per RL step, written by the
trainer loop), ``sft.jsonl`` and ``eval.jsonl`` (warm-start steps and evaluations),
``serving/`` (checkpoints an SGLang server reloads; the newest ``keep_serving`` are kept),
``tensorboard/`` when asked, and ``metrics.json`` (the run's summary, replaced atomically at the end
of every run). A rerun with the same ``OUT`` resumes from the newest checkpoint, skips the warm
start, and cuts the records that the killed run wrote after that checkpoint, so no step is logged
twice; a rerun of a finished run says so and trains nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from miles_envs.engine import SamplingParams
from miles_envs.atomic import write_text_atomically
from miles_envs.loop import LoopConfig, rollout
from miles_envs.weight_sync import CheckpointFolder, Tensors, WeightSource

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
    async_mode: bool = False  # rollouts keep running while the trainer trains (trainer.async_loop)
    max_staleness: int | None = None  # async: versions a trajectory may lag the trainer (default 1)
    on_stale: str = "drop"
    oversample: float = 1.0
    max_buffer_tokens: int | None = None
    staleness_decay: float = 1.0
    keep_checkpoints: int = 2
    keep_serving: int = 2


class Reporter(Protocol):
    """What the run tells the progress display."""

    def resumed(self, step: int, warm_started: bool) -> None: ...

    def sft_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def train_step(self, metrics: dict[str, float]) -> None: ...

    def evaluated(self, step: int, reward: float, phase: str) -> None: ...


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
    if not 0.0 < settings.staleness_decay <= 1.0:
        raise ValueError(f"--staleness-decay {settings.staleness_decay}: must be in (0, 1] (1: stale tokens weigh like fresh ones)")
    if settings.async_mode:
        from miles_envs.trainer.async_loop import LiveUpdateUnsupported

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
    from miles_envs.trainer.async_loop import AsyncSettings

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


class SyncedEngine:
    """The rollout engine with the trainer's weight sync in the form this engine takes weights.

    The trainer loop calls ``update_weights(Tensors(trainer.state_dict()), version=...)``; ``push``
    turns that into an in-process load, an adapter update, or a checkpoint folder the server reloads.
    """

    def __init__(self, engine: Any, push: Callable[[Any, Any, str | None], Any]) -> None:
        self.engine, self._push = engine, push

    def __getattr__(self, name: str) -> Any:  # capacity() and the like: the wrapped engine's
        return getattr(self.engine, name)

    async def generate(self, *args: Any, **kwargs: Any):
        return await self.engine.generate(*args, **kwargs)

    async def update_weights(self, source: WeightSource, *, version: str | None = None) -> None:
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
            await engine.update_weights(CheckpointFolder(folder), version=version)
        else:
            if adapter_loaded:
                await engine.unload_lora_adapter(ADAPTER_NAME)
            await engine.load_lora_adapter(ADAPTER_NAME, str(folder))
            adapter_loaded = True
        prune_serving(serving, settings.keep_serving)

    return SyncedEngine(make_engine(settings.engine), push_to_disk)


def prune_serving(serving: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``serving/step-N`` folders (the server has loaded the newest)."""
    from miles_envs.trajectory import version_number

    folders = sorted((p for p in serving.glob("step-*") if p.is_dir()), key=lambda p: version_number(p.name) or 0)
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class RayRollouts:
    collect: Callable[..., Any]  # a synchronous step's rollout
    run_group: Callable[..., Any]  # one group, for asynchronous training


def ray_rollouts(settings: TrainSettings, engine: SyncedEngine) -> tuple[SyncedEngine, RayRollouts]:
    """Rollouts on ``settings.ray_workers`` Ray actors, each with its own embedded engine on ``--model``.

    Returns the engine to sync (the local one, kept for eval, plus every worker's) and the
    functions the trainer loops call instead of their in-process rollout.
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

    async def run_group(index: int, group_size: int, config: LoopConfig, env_seed: int):
        """One group on worker ``index % N`` (asynchronous training streams groups, not steps)."""
        worker = workers[index % len(workers)]
        for trajectory in await worker.run.remote(settings.env_id, 0, 1, group_size, config, env_seed):
            yield trajectory

    return SyncedEngine(local, push), RayRollouts(collect, run_group)


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
    """The run's JSON-lines files and the optional TensorBoard / W&B sinks.

    A W&B run keeps one id per ``OUT`` (in ``OUT/wandb_run_id``), so a resumed run continues it.
    """

    def __init__(self, out: Path, log: tuple[str, ...]) -> None:
        from miles_envs.logging_sinks import FanOutSink, JsonSink, WandbSink, open_sink

        self.sft = JsonSink(out / "sft.jsonl")
        self.eval = JsonSink(out / "eval.jsonl")
        sinks = []
        for spec in log:
            if spec in ("json", "jsonl"):
                continue
            if spec == "tensorboard":
                spec = f"tensorboard:{out / 'tensorboard'}"
            kind, _, project = spec.partition(":")
            if kind == "wandb" and project:
                sinks.append(WandbSink(project, name=out.name, dir=out, run_id=wandb_run_id(out)))
            else:
                sinks.append(open_sink(spec))
        self.dashboards = FanOutSink(sinks)

    def close(self) -> None:
        for sink in (self.sft, self.eval, self.dashboards):
            sink.close()


def wandb_run_id(out: Path) -> str:
    """The W&B run id of this run folder, made once."""
    file = out / "wandb_run_id"
    if not file.is_file():
        write_text_atomically(file, uuid.uuid4().hex[:16])
    return file.read_text().strip()




def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line torn by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


RECORD_FILES = ("metrics.jsonl", "sft.jsonl", "eval.jsonl")


def prepare_out(out: Path) -> int | None:
    """The step of ``OUT``'s newest checkpoint (None: a fresh run), with the run's records made to
    match it: a fresh run drops records a killed, never-checkpointed run left; a resumed one cuts
    eval records after its checkpoint (the trainer loop cuts its own)."""
    from miles_envs.trainer.checkpoint import checkpoint_step, latest_checkpoint
    from miles_envs.trainer.loop import trim_jsonl

    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        for name in RECORD_FILES:
            (out / name).unlink(missing_ok=True)
        return None
    step = checkpoint_step(checkpoint)
    trim_jsonl(out / "eval.jsonl", step)
    return step


async def run_training(settings: TrainSettings, reporter: Reporter) -> dict[str, Any]:
    """Warm start (fresh runs), then RL in chunks of ``eval_every`` steps with an eval after each
    (synchronous), or one asynchronous run that evaluates every ``eval_every`` steps."""
    from miles_envs.cli.wiring import build_renderer
    from miles_envs.registry import spec
    from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    spec(settings.env_id)  # unknown env ids fail before any model loads
    check_settings(settings)
    started = time.perf_counter()
    out = settings.out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder for the run (checkpoints, metrics, logs)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be created ({exc.strerror or exc}): give a writable folder") from None
    resumed_step = prepare_out(out)
    if resumed_step is not None:
        reporter.resumed(resumed_step, True)
        if resumed_step >= settings.steps:
            return {**write_summary(settings, time.perf_counter() - started), "already_complete": True}
    trainer = load_backend(settings.backend).from_pretrained(str(settings.model), trainer_config(settings))
    renderer = build_renderer(f"embedded:{settings.model}", None)
    resume = latest_checkpoint(out / "checkpoints")
    if resume is not None:
        load_checkpoint(trainer, resume)
    engine = await build_engine(settings, trainer)
    ray = None
    if settings.ray_workers:
        engine, ray = ray_rollouts(settings, engine)
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
        await engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version)
        if resume is None and settings.sft_warmup:
            await warm_start_run(settings, trainer, renderer, log, reporter, eval_now if settings.eval_every else None)
            save_checkpoint(trainer, out / "checkpoints", keep=settings.keep_checkpoints)
            await engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version)
        evaluated = {int(e["step"]) for e in read_jsonl(out / "eval.jsonl") if e["phase"] == RL_PHASE}
        if settings.eval_every and trainer.step not in evaluated:
            await eval_now()
        common = dict(
            renderer=renderer, tasks_per_step=settings.tasks_per_step, group_size=settings.group_size,
            loop_config=loop_config, out_dir=out, checkpoint_every=settings.checkpoint_every,
            keep_checkpoints=settings.keep_checkpoints, seed=settings.seed, on_step=on_train_step,
        )
        if settings.async_mode:
            await train_rl_async(settings, engine, trainer, ray, common, eval_now)
        else:
            await train_rl_sync(settings, engine, trainer, ray, common, eval_now)
    finally:
        log.close()
        await engine.close()
    return write_summary(settings, time.perf_counter() - started)


async def train_rl_sync(settings: TrainSettings, engine, trainer, ray, common: dict[str, Any], eval_now) -> None:
    """RL in chunks of ``eval_every`` steps with an eval after each."""
    from miles_envs.trainer.loop import train

    while trainer.step < settings.steps:
        chunk_end = settings.steps
        if settings.eval_every:
            chunk_end = min(settings.steps, (trainer.step // settings.eval_every + 1) * settings.eval_every)
        await train(settings.env_id, engine, trainer, chunk_end, collect=ray and ray.collect, **common)
        if settings.eval_every:
            await eval_now()


async def train_rl_async(settings: TrainSettings, engine, trainer, ray, common: dict[str, Any], eval_now) -> None:
    """One asynchronous run; evals every ``eval_every`` steps while rollouts continue."""
    from miles_envs.trainer.async_loop import train_async

    async def after_step(step: int) -> None:
        if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
            await eval_now()

    await train_async(
        settings.env_id, engine, trainer, settings.steps, settings=async_settings(settings), after_step=after_step,
        run_group=ray and ray.run_group, **common,
    )


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
    write_text_atomically(out / "metrics.json", json.dumps(summary, indent=2))
    return summary
