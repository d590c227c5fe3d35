"""``miles-envs train``: RL on a registered env. The options become ``TrainSettings`` that
``miles_envs.pipeline.run_training`` runs (rollout -> train -> weight sync); this module adds the
progress bars on a terminal and a periodic plain line otherwise (log files, CI, cluster jobs)."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from miles_envs.agents.sglang import EngineAdminError
from miles_envs.cli.common import err, fail


class ProgressReporter:
    """Warm-start and RL bars, with the latest loss, rollout reward and eval reward."""

    def __init__(self, progress: Progress, sft_steps: int, steps: int) -> None:
        self.progress = progress
        self.sft_steps = sft_steps
        self.sft = progress.add_task("warm start", total=sft_steps, info="", visible=sft_steps > 0)
        self.rl = progress.add_task("RL", total=steps, info="")
        self.eval = ""

    def resumed(self, step: int, warm_started: bool) -> None:
        if warm_started:
            self.progress.update(self.sft, completed=self.sft_steps, info="done")
        self.progress.update(self.rl, completed=step, info=f"resumed at step {step}")

    def sft_step(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.sft, completed=step, info=f"loss {metrics['sft/loss']:.3f}")

    def train_step(self, metrics: dict[str, float]) -> None:
        self.progress.update(self.rl, completed=int(metrics["step"]), info=f"reward {metrics['reward_mean']:.3f}{self.eval}")

    def evaluated(self, step: int, reward: float, phase: str) -> None:
        self.eval = f"  eval {reward:.3f}"
        if phase == "rl":
            self.progress.update(self.rl, completed=step, info=f"eval {reward:.3f} at step {step}")
        self.progress.console.print(f"eval ({phase.replace('_', ' ')}) step {step}: mean reward {reward:.3f}", highlight=False)


class PlainReporter:
    """One plain line at most every ``interval`` seconds (and at the last step of each phase)."""

    def __init__(self, sft_steps: int, steps: int, interval: float) -> None:
        self.sft_steps, self.steps, self.interval = sft_steps, steps, interval
        self.started = time.monotonic()
        self.last = float("-inf")

    def line(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            elapsed = int(now - self.started)
            err.print(f"[{elapsed // 60:d}m{elapsed % 60:02d}s] {text}", highlight=False, markup=False)

    def resumed(self, step: int, warm_started: bool) -> None:
        if step < self.steps:
            warm = " (warm start done)" if warm_started and self.sft_steps else ""
            self.line(f"resuming at RL step {step}/{self.steps}{warm}", force=True)

    def sft_step(self, step: int, metrics: dict[str, float]) -> None:
        self.line(f"warm start {step}/{self.sft_steps}  loss {metrics['sft/loss']:.3f}", force=step == self.sft_steps)

    def train_step(self, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        self.line(f"RL step {step}/{self.steps}  reward {metrics['reward_mean']:.3f}", force=step == self.steps)

    def evaluated(self, step: int, reward: float, phase: str) -> None:
        self.line(f"eval ({phase.replace('_', ' ')}) step {step}: mean reward {reward:.3f}", force=True)


def quiet_library_progress() -> None:
    """transformers' own loading/saving bars would interleave with ours: the run reports progress."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> None:
    """Keep freed blocks up to 1 GiB in the process instead of returning them to the system.

    A CPU step allocates and frees tensors of a whole vocabulary's logits (40 MB for 64 rows of
    Qwen3's 152k); glibc maps each one anew, so every step faults the same pages in again, which
    made a quarter of the demo run's CPU time system time. No-op where the C library is not glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        env_id: str = typer.Argument(..., help="registered env id, e.g. miles/Echo-v0"),
        model: Path = typer.Option(..., "--model", help="HF checkpoint folder (e.g. from `miles-envs init-model`)"),
        out: Path = typer.Option(..., "--out", help="run folder: checkpoints, metrics, logs; rerun to resume"),
        steps: int = typer.Option(..., "--steps", min=1, help="RL steps in total (resumed ones count)"),
        backend: str = typer.Option("torch", "--backend", help="torch | megatron"),
        algo: str = typer.Option("grpo", "--algo", help="grpo | dapo | dr_grpo | rloo | gspo"),
        r3: bool = typer.Option(False, "--r3", help="replay the rollout's MoE routing in training"),
        mtp_sft: bool = typer.Option(False, "--mtp-sft", help="train the MTP draft layers on the rollouts"),
        mtp_lr: Optional[float] = typer.Option(None, "--mtp-lr", help="the MTP layers' own learning rate (default: --lr)"),
        lora: int = typer.Option(0, "--lora", min=0, help="LoRA rank (0: train all weights)"),
        lr: float = typer.Option(1e-5, "--lr"),
        tasks_per_step: int = typer.Option(8, "--tasks-per-step", min=1),
        group_size: int = typer.Option(4, "--group-size", min=1, help="episodes per task (GRPO group)"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
        temperature: float = typer.Option(1.0, "--temperature"),
        sft_warmup: int = typer.Option(0, "--sft-warmup", min=0, help="supervised steps on the env's demonstrations first"),
        sft_lr: float = typer.Option(1e-3, "--sft-lr"),
        sft_batch: int = typer.Option(16, "--sft-batch", min=1),
        eval_every: int = typer.Option(0, "--eval-every", min=0, help="greedy eval on held-out seeds every K steps"),
        eval_tasks: int = typer.Option(32, "--eval-tasks", min=1),
        checkpoint_every: int = typer.Option(10, "--checkpoint-every", min=1),
        keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=1, help="newest checkpoints kept under OUT/checkpoints"),
        keep_serving: int = typer.Option(2, "--keep-serving", min=1, help="newest OUT/serving/step-N folders kept (--engine sglang)"),
        engine: Optional[str] = typer.Option(None, "--engine", help="sglang://HOST:PORT (default: embedded on --model)"),
        draft_tokens: int = typer.Option(0, "--draft-tokens", min=0, help="embedded speculative drafts (needs MTP)"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        seed: int = typer.Option(0, "--seed"),
        deterministic: bool = typer.Option(
            False, "--deterministic", help="repeat bit for bit: the embedded engine serves one request at a time (slower)"),
        log: List[str] = typer.Option(["jsonl"], "--log", help="jsonl | tensorboard | wandb:PROJECT (repeatable)"),
        ray: int = typer.Option(0, "--ray", min=0, help="roll out on N Ray worker actors (local cluster, or RAY_ADDRESS)"),
        async_mode: bool = typer.Option(False, "--async", help="keep rolling out while the trainer trains (bounded staleness)"),
        max_staleness: Optional[int] = typer.Option(
            None, "--max-staleness", help="--async: versions a trajectory's oldest token may lag the trainer (default 1)"),
        on_stale: str = typer.Option("drop", "--on-stale", help="--async: drop | resample a group past the bound"),
        oversample: float = typer.Option(1.0, "--oversample", help="--async: keep this many times more groups running"),
        buffer_tokens: Optional[int] = typer.Option(
            None, "--buffer-tokens", help="--async: start no new group while this many tokens wait in the buffer"),
        staleness_decay: float = typer.Option(1.0, "--staleness-decay", help="weigh a token k versions stale by DECAY**k"),
        progress_every: float = typer.Option(30.0, "--progress-every", min=0,
                                             help="seconds between plain progress lines when stderr is not a terminal"),
    ) -> None:
        """Train a policy on an env with RL; a rerun with the same --out resumes from its checkpoint."""
        from miles_envs.cli.wiring import build_renderer
        from miles_envs.pipeline import BackendUnavailable, TrainSettings, run_training
        from miles_envs.registry import RegistryError

        settings = TrainSettings(
            env_id=env_id, model=model, out=out, steps=steps, backend=backend, algo=algo, r3=r3, mtp_sft=mtp_sft, mtp_lr=mtp_lr,
            lora_rank=lora, lr=lr, tasks_per_step=tasks_per_step, group_size=group_size, max_new_tokens=max_new_tokens,
            temperature=temperature, sft_warmup=sft_warmup, sft_lr=sft_lr, sft_batch=sft_batch, eval_every=eval_every,
            eval_tasks=eval_tasks, checkpoint_every=checkpoint_every, engine=engine, draft_tokens=draft_tokens,
            device=device, seed=seed, deterministic=deterministic, log=tuple(log), ray_workers=ray, async_mode=async_mode, max_staleness=max_staleness,
            on_stale=on_stale, oversample=oversample, max_buffer_tokens=buffer_tokens, staleness_decay=staleness_decay,
            keep_checkpoints=keep_checkpoints, keep_serving=keep_serving,
        )
        make_renderer = functools.partial(build_renderer, f"embedded:{model}", None)  # the model's own tokenizer
        quiet_library_progress()
        keep_freed_memory()
        try:
            if err.is_terminal:
                columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.fields[info]}"))
                with Progress(*columns, console=err) as progress:
                    summary = asyncio.run(run_training(settings, ProgressReporter(progress, sft_warmup, steps), make_renderer))
            else:
                summary = asyncio.run(run_training(settings, PlainReporter(sft_warmup, steps, progress_every), make_renderer))
        except (RegistryError, BackendUnavailable, ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
            fail(str(exc))
        except EngineAdminError as exc:
            fail(f"{exc}\n  --engine {engine}: no SGLang server answered there; start one (or `miles-envs serve-engine`) "
                 "at that address, or leave out --engine to train on the embedded engine")
        if summary.get("already_complete"):
            err.print(f"already complete: {out} has trained {summary['steps_done']} of --steps {steps}; "
                      "nothing to do (raise --steps to train further)", highlight=False)
        keys = ("steps_done", "eval_reward_before_warmup", "eval_reward_rl_start", "eval_reward_end",
                "train_reward_first", "train_reward_last")
        err.print_json(json.dumps({k: summary[k] for k in keys}))
        err.print(f"metrics → {out / 'metrics.json'}\ncheckpoints → {out / 'checkpoints'}")
