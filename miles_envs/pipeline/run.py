"""One training run as ``miles-envs train`` runs it: wiring, warm start, RL (synchronous or
asynchronous), evals, summary.

Layout of ``OUT``: ``checkpoints/`` (resume point; ``step_000000`` is the warm-started model; the
newest ``keep_checkpoints`` are kept), ``metrics.jsonl`` (one line per RL step, written by the
schedule), ``sft.jsonl`` and ``eval.jsonl`` (warm-start steps and evaluations),
``serving/`` (checkpoints an SGLang server reloads; the newest ``keep_serving`` are kept),
``tensorboard/`` when asked, and ``metrics.json`` (the run's summary, replaced atomically at the end
of every run). A rerun with the same ``OUT`` resumes from the newest checkpoint, skips the warm
start, and cuts the records that the killed run wrote after that checkpoint, so no step is logged
twice; a rerun of a finished run says so and trains nothing.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

from miles_envs.atomic import write_text_atomically
from miles_envs.engine import SamplingParams
from miles_envs.loop import LoopConfig, rollout
from miles_envs.pipeline.async_run import train_async
from miles_envs.pipeline.demonstrations import collect_demonstrations
from miles_envs.pipeline.engines import Rollouts, local_rollouts, ray_rollouts
from miles_envs.pipeline.records import METRICS_FILE, read_jsonl, trim_jsonl
from miles_envs.pipeline.settings import (
    ADAPTER_NAME,
    DEMO_SEED,
    EVAL_SEED,
    RL_PHASE,
    WARMUP_PHASE,
    TrainSettings,
    async_settings,
    check_settings,
    load_backend,
    trainer_config,
)
from miles_envs.pipeline.sync import train
from miles_envs.registry import spec as env_spec
from miles_envs.trainer.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from miles_envs.trainer.sft import warm_start


class Reporter(Protocol):
    """What the run tells the progress display."""

    def resumed(self, step: int, warm_started: bool) -> None: ...

    def sft_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def train_step(self, metrics: dict[str, float]) -> None: ...

    def evaluated(self, step: int, reward: float, phase: str) -> None: ...


def model_renderer(model: str | Path):
    """The chat renderer of the tokenizer saved with the model folder ``model``."""
    from miles_envs.chat import ChatRenderer
    from miles_envs.tokenizers import load_tokenizer

    return ChatRenderer(load_tokenizer(str(model)))


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


RECORD_FILES = (METRICS_FILE, "sft.jsonl", "eval.jsonl")


def prepare_out(out: Path) -> int | None:
    """The step of ``OUT``'s newest checkpoint (None: a fresh run), with the run's records made to
    match it: a fresh run drops records a killed, never-checkpointed run left; a resumed one cuts
    eval records after its checkpoint (the schedule cuts its own)."""
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        for name in RECORD_FILES:
            (out / name).unlink(missing_ok=True)
        return None
    step = checkpoint_step(checkpoint)
    trim_jsonl(out / "eval.jsonl", step)
    return step


async def run_training(
    settings: TrainSettings, reporter: Reporter, make_renderer: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Warm start (fresh runs), then RL in chunks of ``eval_every`` steps with an eval after each
    (synchronous), or one asynchronous run that evaluates every ``eval_every`` steps.

    ``make_renderer`` builds the chat renderer (it must pickle for ``--ray``); by default, the
    renderer of the tokenizer in the model folder.
    """
    env_spec(settings.env_id)  # unknown env ids fail before any model loads
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
    make_renderer = make_renderer or functools.partial(model_renderer, str(settings.model))
    renderer = make_renderer()
    resume = latest_checkpoint(out / "checkpoints")
    if resume is not None:
        load_checkpoint(trainer, resume)
    rollouts = await local_rollouts(settings, trainer)
    if settings.ray_workers:
        rollouts = ray_rollouts(settings, rollouts, make_renderer)
    log = RunLog(out, settings.log)
    loop_config = LoopConfig(
        sampling=SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens, seed=settings.seed),
        lora=ADAPTER_NAME if settings.lora_rank else None,
    )

    async def eval_now(phase: str = RL_PHASE) -> None:
        reward = await evaluate(settings, rollouts.engine, renderer)
        log.eval.log({"eval/reward_mean": reward, "phase": phase}, trainer.step)
        log.dashboards.log({f"eval/reward_mean_{phase}": reward}, trainer.step)
        reporter.evaluated(trainer.step, reward, phase)

    def on_train_step(metrics: dict[str, float]) -> None:
        log.dashboards.log(metrics, trainer.step)
        reporter.train_step(metrics)

    try:
        await rollouts.weight_sync.push(trainer)
        if resume is None and settings.sft_warmup:
            await warm_start_run(settings, trainer, renderer, log, reporter, eval_now if settings.eval_every else None)
            save_checkpoint(trainer, out / "checkpoints", keep=settings.keep_checkpoints)
            await rollouts.weight_sync.push(trainer)
        evaluated = {int(e["step"]) for e in read_jsonl(out / "eval.jsonl") if e["phase"] == RL_PHASE}
        if settings.eval_every and trainer.step not in evaluated:
            await eval_now()
        common = dict(
            renderer=renderer, tasks_per_step=settings.tasks_per_step, group_size=settings.group_size,
            loop_config=loop_config, out_dir=out, checkpoint_every=settings.checkpoint_every,
            keep_checkpoints=settings.keep_checkpoints, seed=settings.seed, on_step=on_train_step,
            weight_sync=rollouts.weight_sync,
        )
        if settings.async_mode:
            await train_rl_async(settings, rollouts, trainer, common, eval_now)
        else:
            await train_rl_sync(settings, rollouts, trainer, common, eval_now)
    finally:
        log.close()
        await rollouts.engine.close()
    return write_summary(settings, time.perf_counter() - started)


async def train_rl_sync(settings: TrainSettings, rollouts: Rollouts, trainer, common: dict[str, Any], eval_now) -> None:
    """RL in chunks of ``eval_every`` steps with an eval after each."""
    while trainer.step < settings.steps:
        chunk_end = settings.steps
        if settings.eval_every:
            chunk_end = min(settings.steps, (trainer.step // settings.eval_every + 1) * settings.eval_every)
        await train(settings.env_id, rollouts.engine, trainer, chunk_end, collect=rollouts.collect, **common)
        if settings.eval_every:
            await eval_now()


async def train_rl_async(settings: TrainSettings, rollouts: Rollouts, trainer, common: dict[str, Any], eval_now) -> None:
    """One asynchronous run; evals every ``eval_every`` steps while rollouts continue."""
    async def after_step(step: int) -> None:
        if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
            await eval_now()

    await train_async(
        settings.env_id, rollouts.engine, trainer, settings.steps, settings=async_settings(settings), after_step=after_step,
        run_group=rollouts.run_group, **common,
    )


async def warm_start_run(settings, trainer, renderer, log: RunLog, reporter: Reporter, eval_now) -> None:
    """Supervised steps on demonstration episodes that the env loop plays (fresh runs only)."""

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
    steps = sorted({int(m["step"]): m for m in read_jsonl(out / METRICS_FILE)}.items())
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
