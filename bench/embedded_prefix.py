"""Embedded-engine prefix reuse on a 10-turn env: per-turn prefill cost and rollout tokens/s.

Workload: ``GuessNumberEnv(max_guesses=10)`` played by a random-init Qwen3 (real vocabulary; a reply
cut at ``--new-tokens`` still goes to the env, ``on_length="continue"``)
through the real env loop, so every turn's input is the previous input + the model's reply + the
env's answer, and groups share their prompt. Two engines on the same checkpoint, one with the
prefix cache and one without (``prefix_cache_tokens=0``), in this one process.

1. Turn-N prefill: one recorded episode's turn inputs are replayed in order, each with
   ``max_new_tokens=1`` (prefill plus one sampled token); CPU time per turn (process time, so a
   shared machine's other load does not count), median of ``--repeats``. With the cache, turn N
   prefills only ``prompt_tokens - cached_tokens`` tokens.
2. Rollout throughput: ``--tasks`` x ``--group`` episodes of 10 turns; generated tokens per CPU
   second and per wall second, best of ``--repeats`` alternating runs; ratio cached / uncached.

    .venv/bin/python bench/embedded_prefix.py [--size small] [--tasks 8] [--group 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.chat import ChatRenderer
from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.loop import LoopConfig, rollout
from miles_envs.models.factory import init_model

RESULTS = Path(__file__).resolve().parent / "results"
TURNS = 10


def ten_turn_env() -> GuessNumberEnv:
    env = GuessNumberEnv(low=1, high=1000, max_guesses=TURNS)
    env.max_turns = TURNS
    return env


async def play(engine: EmbeddedEngine, renderer, tasks: int, group: int, new_tokens: int, seed: int = 0):
    config = LoopConfig(sampling=SamplingParams(max_new_tokens=new_tokens), max_turns=TURNS, on_length="continue")
    return [t async for t in rollout(ten_turn_env, engine, renderer, n=tasks, group_size=group, config=config, seed=seed)]


def turn_inputs(trajectory) -> list[list[int]]:
    """Each model turn's input ids, rebuilt from the token stream (prompt + everything before it)."""
    tokens = list(trajectory.prompt_ids) + list(trajectory.response_ids)
    offset = len(trajectory.prompt_ids)
    return [tokens[: offset + turn.start] for turn in trajectory.turns if turn.kind == "model"]


async def prefill_costs(engine: EmbeddedEngine, inputs: list[list[int]]) -> list[tuple[int, int, float]]:
    """(prompt tokens, cached tokens, CPU seconds) per turn, replaying an episode in order."""
    rows = []
    for ids in inputs:
        start = time.process_time()
        generation = await engine.generate(ids, SamplingParams(max_new_tokens=1, seed=0))
        rows.append((generation.prompt_tokens, generation.cached_tokens, time.process_time() - start))
    return rows


async def throughput(engine: EmbeddedEngine, renderer, args) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.perf_counter()
    trajectories = await play(engine, renderer, args.tasks, args.group, args.new_tokens)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    generated = sum(sum(t.loss_mask) for t in trajectories)
    return generated / cpu, generated / wall, generated


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = init_model(folder, arch="qwen3", size=args.size)
        cached = EmbeddedEngine.from_path(path, device="cpu")
        plain = EmbeddedEngine.from_path(path, device="cpu", prefix_cache_tokens=0)
        renderer = ChatRenderer(cached.tokenizer)
        [episode] = await play(plain, renderer, 1, 1, args.new_tokens, seed=7)
        inputs = turn_inputs(episode)

        per_turn: list[dict] = []
        samples = {"cached": [], "plain": []}
        for _ in range(args.repeats):
            for name, engine in (("cached", cached), ("plain", plain)):
                samples[name].append(await prefill_costs(engine, inputs))
                if engine._prefix is not None:
                    engine._prefix.flush()  # each repeat replays the episode from a cold cache
        for turn in range(len(inputs)):
            prompt, cached_tokens, _ = samples["cached"][0][turn]
            with_cache = statistics.median(run[turn][2] for run in samples["cached"])
            without = statistics.median(run[turn][2] for run in samples["plain"])
            per_turn.append({"turn": turn + 1, "prompt_tokens": prompt, "new_tokens": prompt - cached_tokens,
                             "cpu_ms_cached": 1e3 * with_cache, "cpu_ms_uncached": 1e3 * without})

        runs = {"cached": [], "plain": []}
        await play(cached, renderer, 2, 2, 4)  # warm-up
        for _ in range(args.repeats):
            for name, engine in (("cached", cached), ("plain", plain)):
                runs[name].append(await throughput(engine, renderer, args))
        await cached.close()
        await plain.close()

    best = {name: (max(r[0] for r in rs), max(r[1] for r in rs), rs[0][2]) for name, rs in runs.items()}
    summary = {
        "tok_per_cpu_s_cached": best["cached"][0], "tok_per_cpu_s_uncached": best["plain"][0],
        "cpu_ratio": best["cached"][0] / best["plain"][0],
        "tok_per_wall_s_cached": best["cached"][1], "tok_per_wall_s_uncached": best["plain"][1],
        "wall_ratio": best["cached"][1] / best["plain"][1],
        "all_runs": {name: [list(r) for r in rs] for name, rs in runs.items()},
        "last_turn_prefill_ratio": per_turn[-1]["cpu_ms_cached"] / per_turn[-1]["cpu_ms_uncached"],
    }

    console = Console()
    table = Table(title=f"prefill of turn N, qwen3 {args.size}, CPU ms (process time, median of {args.repeats})")
    for column in ("turn", "prompt tokens", "new tokens", "cached ms", "uncached ms", "cached ms / new token", "uncached ms / token"):
        table.add_column(column, justify="right")
    for row in per_turn:
        table.add_row(str(row["turn"]), str(row["prompt_tokens"]), str(row["new_tokens"]), f"{row['cpu_ms_cached']:.1f}",
                      f"{row['cpu_ms_uncached']:.1f}", f"{row['cpu_ms_cached'] / row['new_tokens']:.2f}",
                      f"{row['cpu_ms_uncached'] / row['prompt_tokens']:.2f}")
    console.print(table)
    table = Table(title=f"{args.tasks} x {args.group} episodes of {TURNS} turns, best of {args.repeats}")
    for column in ("engine", "tokens / CPU s", "tokens / wall s"):
        table.add_column(column, justify="right")
    table.add_row("prefix cache", f"{summary['tok_per_cpu_s_cached']:.0f}", f"{summary['tok_per_wall_s_cached']:.0f}")
    table.add_row("no cache", f"{summary['tok_per_cpu_s_uncached']:.0f}", f"{summary['tok_per_wall_s_uncached']:.0f}")
    table.add_row("ratio", f"{summary['cpu_ratio']:.2f}x", f"{summary['wall_ratio']:.2f}x")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    out = {"model": f"qwen3/{args.size}", "device": "cpu", "threads": torch.get_num_threads(), "turns": TURNS,
           **vars(args), "per_turn": per_turn, **summary}
    (RESULTS / "embedded_prefix.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
