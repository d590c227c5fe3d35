"""Embedded engine under multi-turn drafts: CPU cost of a rollout of many short concurrent episodes.

Workload: ``--tasks`` x ``--group`` episodes of ``GuessNumberEnv`` (4 turns, a reply cut at
``--new-tokens`` still goes to the env), sampled at temperature 1 with routing capture on, as a
GRPO rollout runs them, through the real env loop and the real qwen3 chat template, so episodes
join the running batch one by one as their env steps finish and every turn re-sends the whole
conversation. Model: a tiny random-init Qwen3-MoE with one MTP layer, made a partly-right drafter
(``models.toy.make_draftable``). Each repeat runs the rollout with ``draft_tokens`` 0 and
``--draft-tokens``; CPU time is process time (all threads), so other load on the machine does not
count. Results go to ``bench/results/embedded_multiturn.json`` under ``--label``, so that two
versions of the engine can be compared run by run (fresh processes, alternated).

    .venv/bin/python bench/embedded_multiturn.py --label after [--tasks 16] [--group 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.chat import ChatRenderer
from miles_envs.engine import SamplingParams
from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.loop import LoopConfig, rollout
from miles_envs.models.factory import init_model
from miles_envs.models.loading import load_checkpoint
from miles_envs.models.toy import make_draftable

RESULTS = Path(__file__).resolve().parent / "results" / "embedded_multiturn.json"
TURNS = 4


def four_turn_env() -> GuessNumberEnv:
    env = GuessNumberEnv(low=1, high=1000, max_guesses=TURNS)
    env.max_turns = TURNS
    return env


async def timed_rollout(engine: EmbeddedEngine, renderer, args, seed: int) -> dict:
    config = LoopConfig(sampling=SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=seed),
                        max_turns=TURNS, on_length="continue", return_routed_experts=True)
    cpu = time.process_time()
    trajectories = [t async for t in rollout(four_turn_env, engine, renderer, n=args.tasks, group_size=args.group,
                                             config=config, seed=seed)]
    cpu = time.process_time() - cpu
    generated = sum(sum(t.loss_mask) for t in trajectories)
    return {"cpu_s": cpu, "generated_tokens": generated, "cpu_ms_per_token": 1e3 * cpu / generated}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="name of this engine version in the results file")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--draft-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in ("tasks", "group", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.draft_tokens < 0:
        parser.error(f"--draft-tokens must be 0 (plain decoding) or more, got {args.draft_tokens}")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time of one thread: no spin-waiting of idle threads on a shared machine

    runs: dict[int, list[dict]] = {0: [], args.draft_tokens: []}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = load_checkpoint(init_model(folder, arch="qwen3-moe", size="tiny", mtp=1), device="cpu")
        make_draftable(checkpoint.model, checkpoint.mtp, residual_scale=0.5)
        renderer = ChatRenderer(checkpoint.tokenizer)
        warm = argparse.Namespace(**{**vars(args), "tasks": 1, "group": 2})
        for draft in runs:  # first calls pay one-time costs (allocator, kernels' first use)
            engine = EmbeddedEngine(checkpoint, draft_tokens=draft)
            await timed_rollout(engine, renderer, warm, seed=-1)
            await engine.close()
        for repeat in range(args.repeats):
            for draft in runs:
                engine = EmbeddedEngine(checkpoint, draft_tokens=draft, max_running=args.tasks * args.group)
                runs[draft].append(await timed_rollout(engine, renderer, args, seed=repeat))
                await engine.close()

    summary = {str(draft): {"cpu_ms_per_token_median": statistics.median(r["cpu_ms_per_token"] for r in rs), "runs": rs}
               for draft, rs in runs.items()}
    table = Table(title=f"{args.tasks} x {args.group} episodes of {TURNS} turns, <= {args.new_tokens} tokens a turn "
                        f"({args.label}; CPU process time, median of {args.repeats})")
    for column in ("draft tokens", "CPU ms / generated token", "CPU s per rollout"):
        table.add_column(column, justify="right")
    for draft, rs in runs.items():
        table.add_row(str(draft), f"{summary[str(draft)]['cpu_ms_per_token_median']:.2f}",
                      " ".join(f"{r['cpu_s']:.2f}" for r in rs))
    Console().print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault(args.label, []).append({"commit": commit, "threads": torch.get_num_threads(), **vars(args),
                                               "by_draft_tokens": summary})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
