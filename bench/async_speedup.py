"""Asynchronous vs synchronous training: wall-clock speed-up on a long-tailed agentic workload, and a
real small run of both modes.

**Simulated workload** (the scheduler's effect, reproducible on a 2-core machine). The same code
paths as ``miles-envs train`` run it: ``pipeline.sync.train`` (synchronous) and
``pipeline.async_run.train_async`` (asynchronous), the real env loop and chat renderer (Qwen3
tokenizer), with three simulated parts:

- *Engine*: the shipped throughput model of a continuous-batching server
  (``agents.throughput_model.ThroughputModel`` over scripted replies). At most ``--capacity``
  sequences decode at once (the rest queue); every decode step advances each running sequence by
  one token and takes ``--decode-base-ms + --decode-per-seq-ms x running`` milliseconds (no prefill
  cost, no update pause). A weight update lands between decode steps; a sequence that continues
  across it reports its tokens' versions as two spans (``Generation.version_spans``), as the
  contract asks of any engine.
- *Env*: an agent episode of ``T`` model turns with a tool call between turns. ``T`` is drawn per
  episode from a discrete Pareto law, ``P(T >= t) = t ** -alpha`` (``--turns-alpha``, 1.2 by
  default), capped at ``--max-turns`` 24: the median episode has 2 turns, one in ~20 has 12 or
  more. Each tool call sleeps a log-normal latency (median ``--tool-median-ms`` 40 ms, log-sd
  ``--tool-sigma`` 1.0: p99 ≈ 10x the median), like a sandbox or search call. Each reply is
  ``--reply-tokens`` tokens.
- *Trainer*: ``train_step`` takes ``--train-ms`` milliseconds (a stand-in for the optimizer step
  on a real cluster, chosen near the median step's rollout time so neither side dominates).

Both modes train the same number of steps of ``tasks_per_step x group_size`` episodes; the
speed-up is synchronous wall time over asynchronous wall time, per ``max_staleness`` in
``--staleness``, median of ``--repeats`` paired runs (with min-max). Groups dropped for staleness
are reported beside it: dropping is what bounded staleness costs on a long tail.

**Real run**: a tiny random-init Qwen3 warm-started on ``miles/Echo-v0`` demonstrations, then
``--real-steps`` GRPO steps of ``--real-tasks`` x 8 episodes with the embedded engine and the torch
trainer, once synchronously and once asynchronously (staleness 1), from the same warm-started
weights; the per-step rollout reward curves of both are reported, with the standard error of a
step's mean as the noise they are compared against.

    .venv/bin/python bench/async_speedup.py     # prints tables, writes bench/results/async_speedup.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.throughput_model import ThroughputModel
from miles_envs.engine import SamplingParams
from miles_envs.chat import ChatRenderer
from miles_envs.env import Env, user
from miles_envs.loop import LoopConfig
from miles_envs.tokenizers import load_tokenizer
from miles_envs.weight_sync import Tensors
from miles_envs.pipeline.async_run import AsyncSettings, train_async
from miles_envs.pipeline.sync import train

RESULTS = Path(__file__).resolve().parent / "results" / "async_speedup.json"


# -- the long-tailed env -------------------------------------------------------------------------
class Workload:
    """The random draws of one run (turn counts, tool latencies), from one seeded stream."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args, self.rng = args, random.Random(seed)

    def turns(self) -> int:
        u = 1.0 - self.rng.random()  # (0, 1]
        return min(self.args.max_turns, int(u ** (-1.0 / self.args.turns_alpha)))

    def tool_latency_s(self) -> float:
        return self.args.tool_median_ms / 1000 * math.exp(self.rng.gauss(0.0, self.args.tool_sigma))


def long_tail_env(workload: Workload) -> type[Env]:
    class LongTailToolEnv(Env):
        """An agent episode: a drawn number of model turns with a tool call (latency drawn) between."""

        max_turns = None

        async def areset(self, seed=None, options=None):
            self.turns_left = workload.turns()
            return [user("Solve the task; call tools as needed.")], {}

        async def astep(self, action):
            self.turns_left -= 1
            if self.turns_left <= 0:
                return [], workload.rng.random(), True, False, {}
            await asyncio.sleep(workload.tool_latency_s())
            return [{"role": "tool", "content": "tool output"}], 0.0, False, False, {}

    return LongTailToolEnv


class SimulatedTrainer:
    """A trainer whose step takes a fixed time; it counts versions like the real ones."""

    config = SimpleNamespace(r3=False)

    def __init__(self, train_s: float) -> None:
        self.train_s, self.step = train_s, 0

    @property
    def weight_version(self) -> str:
        return f"step-{self.step}"

    def train_step(self, trajectories) -> dict[str, float]:
        time.sleep(self.train_s)
        self.step += 1
        return {"step": float(self.step), "reward_mean": statistics.fmean(t.reward for t in trajectories)}

    def state_dict(self) -> dict:
        return {}


async def simulated_run(args: argparse.Namespace, renderer: ChatRenderer, staleness: int | None, seed: int) -> dict[str, Any]:
    """One run of ``args.steps`` steps; ``staleness`` None is the synchronous loop."""
    # reply_tokens - 1 tokens of text, then the end-of-turn token
    reply = renderer.tokenizer.decode(renderer.tokenizer.encode("x " * args.reply_tokens, add_special_tokens=False)[: args.reply_tokens - 1])
    replies = ScriptedEngine(renderer.tokenizer, [reply], eos_token_id=renderer.turn_end_id, weight_version="step-0")
    engine = ThroughputModel(replies, slots=args.capacity, decode_s=args.decode_base_ms / 1000,
                             decode_s_per_running=args.decode_per_seq_ms / 1000, prefill_s_per_token=0.0, update_pause_s=0.0,
                             weight_version="step-0")
    trainer = SimulatedTrainer(args.train_ms / 1000)
    env = long_tail_env(Workload(args, seed))
    # one token of headroom: a reply that ends exactly at max_new_tokens finishes "length" (as in SGLang), ending the episode
    config = LoopConfig(sampling=SamplingParams(max_new_tokens=args.reply_tokens + 1), max_turns=args.max_turns, max_context=1 << 20)
    common = dict(renderer=renderer, tasks_per_step=args.tasks_per_step, group_size=args.group_size, loop_config=config, seed=seed)
    started = time.perf_counter()
    try:
        if staleness is None:
            history = await train(env, engine, trainer, args.steps, **common)
        else:
            history = await train_async(env, engine, trainer, args.steps, settings=AsyncSettings(max_staleness=staleness), **common)
    finally:
        await engine.close()
    wall = time.perf_counter() - started
    trained_groups = args.steps * args.tasks_per_step
    dropped = sum(m.get("buffer/dropped_groups", 0.0) for m in history)
    return {
        "wall_s": wall,
        "dropped_groups": dropped,
        "dropped_frac": dropped / (trained_groups + dropped),
        "token_staleness_mean": statistics.fmean(m.get("staleness/tokens_mean", 0.0) for m in history),
        "trainer_busy_frac": statistics.fmean(m["time/trainer_busy_frac"] for m in history) if staleness is not None else None,
    }


async def simulated(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    renderer = ChatRenderer(load_tokenizer("qwen3"))
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], **{str(k): [] for k in args.staleness}}
    for repeat in range(args.repeats):
        seed = 1000 * repeat
        runs["sync"].append(await simulated_run(args, renderer, None, seed))
        for k in args.staleness:
            runs[str(k)].append(await simulated_run(args, renderer, k, seed))
    rows = []
    for k in args.staleness:
        ratios = [s["wall_s"] / a["wall_s"] for s, a in zip(runs["sync"], runs[str(k)])]
        rows.append({
            "max_staleness": k,
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "async_wall_s": statistics.median(r["wall_s"] for r in runs[str(k)]),
            "sync_wall_s": statistics.median(r["wall_s"] for r in runs["sync"]),
            "dropped_frac": statistics.fmean(r["dropped_frac"] for r in runs[str(k)]),
            "token_staleness_mean": statistics.fmean(r["token_staleness_mean"] for r in runs[str(k)]),
            "trainer_busy_frac": statistics.fmean(r["trainer_busy_frac"] for r in runs[str(k)]),
        })
    table = Table(title=f"simulated agentic workload: {args.steps} steps x {args.tasks_per_step} groups x {args.group_size}, "
                        f"{args.repeats} paired repeats (wall clock)")
    for column in ("max staleness", "sync s", "async s", "speed-up (min-max)", "groups dropped", "token staleness", "trainer busy"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["max_staleness"]), f"{row['sync_wall_s']:.1f}", f"{row['async_wall_s']:.1f}",
                      f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})",
                      f"{100 * row['dropped_frac']:.1f}%", f"{row['token_staleness_mean']:.2f}", f"{100 * row['trainer_busy_frac']:.0f}%")
    console.print(table)
    return {"rows": rows, "runs": runs}


# -- the real run --------------------------------------------------------------------------------
async def real_run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    import torch

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.models.factory import init_model
    from miles_envs.trainer import Trainer, TrainerConfig
    from miles_envs.pipeline.demonstrations import collect_demonstrations
    from miles_envs.trainer.sft import warm_start

    env_id = "miles/Echo-v0"
    config = TrainerConfig(lr=args.real_lr, device="cpu", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = init_model(Path(tmp) / "model", arch="qwen3", size="tiny")
        teacher = Trainer.from_pretrained(str(folder), config)
        renderer = ChatRenderer(load_tokenizer(str(folder)))
        demos = await collect_demonstrations(env_id, renderer, range(2_000_000, 2_000_128), max_new_tokens=8)
        warm_start(teacher, demos, args.real_warmup, batch_size=16, lr=5e-3)
        warmed = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        curves = {}
        for mode in ("sync", "async"):
            trainer = Trainer.from_pretrained(str(folder), config)
            trainer.model.load_state_dict(warmed)
            engine = EmbeddedEngine.from_path(folder, device="cpu")
            await engine.update_weights(Tensors(trainer.state_dict()), version=trainer.weight_version)
            loop_config = LoopConfig(sampling=SamplingParams(max_new_tokens=8, seed=0))
            common = dict(renderer=renderer, tasks_per_step=args.real_tasks, group_size=8, loop_config=loop_config, seed=0)
            torch.manual_seed(0)
            started = time.perf_counter()
            try:
                if mode == "sync":
                    history = await train(env_id, engine, trainer, args.real_steps, **common)
                else:
                    history = await train_async(env_id, engine, trainer, args.real_steps,
                                                settings=AsyncSettings(max_staleness=1), **common)
            finally:
                await engine.close()
            curves[mode] = {"reward": [m["reward_mean"] for m in history], "wall_s": time.perf_counter() - started,
                            "reward_se": [m["reward_std"] / math.sqrt(m["trajectories"]) for m in history],
                            "token_staleness_mean": statistics.fmean(m.get("staleness/tokens_mean", 0.0) for m in history)}
    sync, asyn = curves["sync"]["reward"], curves["async"]["reward"]
    diffs = [a - s for s, a in zip(sync, asyn)]
    summary = {
        "reward_mean_sync": statistics.fmean(sync),
        "reward_mean_async": statistics.fmean(asyn),
        "reward_diff_mean": statistics.fmean(diffs),
        # the noise of one step's reward mean: its standard error over the step's episodes, averaged
        "step_noise_sd": statistics.fmean(se for mode in curves.values() for se in mode["reward_se"]),
    }
    table = Table(title=f"real run: tiny qwen3 on {env_id}, embedded engine + torch trainer, {args.real_tasks} x 8 episodes per step")
    table.add_column("step", justify="right")
    table.add_column("sync reward", justify="right")
    table.add_column("async reward (staleness 1)", justify="right")
    for i, (s, a) in enumerate(zip(sync, asyn), 1):
        table.add_row(str(i), f"{s:.3f}", f"{a:.3f}")
    console.print(table)
    console.print(f"mean reward sync {summary['reward_mean_sync']:.3f}, async {summary['reward_mean_async']:.3f} "
                  f"(difference {summary['reward_diff_mean']:+.3f}; standard error of a step's mean {summary['step_noise_sd']:.3f}); "
                  f"wall sync {curves['sync']['wall_s']:.0f} s, async {curves['async']['wall_s']:.0f} s")
    return {"curves": curves, "summary": summary, "steps": args.real_steps, "warmup_steps": args.real_warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tasks-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=128)
    parser.add_argument("--decode-base-ms", type=float, default=4.0)
    parser.add_argument("--decode-per-seq-ms", type=float, default=0.02)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--turns-alpha", type=float, default=1.2)
    parser.add_argument("--max-turns", type=int, default=24)
    parser.add_argument("--tool-median-ms", type=float, default=40.0)
    parser.add_argument("--tool-sigma", type=float, default=1.0)
    parser.add_argument("--train-ms", type=float, default=600.0)
    parser.add_argument("--real-steps", type=int, default=10)
    parser.add_argument("--real-tasks", type=int, default=4)
    parser.add_argument("--real-warmup", type=int, default=150)
    parser.add_argument("--real-lr", type=float, default=2e-3)
    parser.add_argument("--no-real", action="store_true", help="skip the real embedded-engine run")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer steps and repeats)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.staleness, args.real_steps, args.real_warmup = 4, 1, [1, 2], 2, 5
    console = Console(width=160)
    results: dict[str, Any] = {"settings": vars(args), "simulated": asyncio.run(simulated(args, console))}
    if not args.no_real:
        results["real"] = asyncio.run(real_run(args, console))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    console.print(f"results → {RESULTS}")


if __name__ == "__main__":
    main()
