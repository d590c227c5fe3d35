"""The README main job over several seeds: held-out wins before the warm start, after it, and after RL.

Runs ``miles-envs init-model`` and ``miles-envs train`` (the README's flags, ``MAIN_JOB_FLAGS``) once
per seed as separate processes, at most ``--jobs`` at a time, each on one thread; per-run CPU time
comes from ``os.wait4`` (user + system of that process alone, so runs sharing the machine do not
inflate each other's figure). Then it plays ``--eval-games`` held-out games greedily, on the
embedded engine's deterministic schedule as the runs do, with the model as initialised, the warm-started checkpoint (step 0) and the last one: games won with a Wilson 95%
interval, mean reward, and which secrets each policy finds. A greedy policy on a fixed prompt plays
each secret the same way every time, so the interval is the uncertainty of sampling the secrets.

Writes ``RESULTS/seed{N}.json`` (the run's ``metrics.json``, its CPU and wall time, the held-out
eval), ``RESULTS/summary.json`` (the table, with RL's lift and the spread across seeds),
``RESULTS/guess_number7_curves.png`` (``miles-envs plot`` of all runs) and the README's demo
section between its markers, and prints the table.

    python bench/demo_lift.py              # seeds 0 1 2 -> bench/results/demo/ and the README section
    python bench/demo_lift.py --stored     # only rewrite the README section from summary.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ENV_ID = "miles/GuessNumber7-v0"
# The README's `miles-envs train` command, less --model/--out/--seed.
MAIN_JOB_FLAGS = (
    "--sft-warmup", "300", "--sft-lr", "5e-3", "--steps", "40", "--lr", "1e-3", "--tasks-per-step", "8",
    "--group-size", "8", "--max-new-tokens", "4", "--eval-every", "10", "--eval-tasks", "64", "--deterministic",
)
KEEP_ALL_CHECKPOINTS = ("--keep-checkpoints", "1000")  # bench only: the warm start's checkpoint stays for the eval
REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"
PNG = "guess_number7_curves.png"


def cli() -> str:
    return str(Path(sys.executable).with_name("miles-envs"))


def flag(name: str) -> str:
    return MAIN_JOB_FLAGS[MAIN_JOB_FLAGS.index(name) + 1]


def start_run(work: Path, seed: int) -> tuple[subprocess.Popen, float]:
    """init-model then train for one seed, as one shell process (its children's CPU time is its own)."""
    model, out = work / f"model{seed}", work / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    init = [cli(), "init-model", str(model), "--arch", "qwen3", "--size", "tiny", "--tokenizer", "qwen3", "--seed", str(seed)]
    train = [cli(), "train", ENV_ID, "--model", str(model), "--out", str(out), *MAIN_JOB_FLAGS, "--seed", str(seed),
             "--device", "cpu", *KEEP_ALL_CHECKPOINTS]
    script = f"{subprocess.list2cmdline(init)} && {subprocess.list2cmdline(train)}"
    log = (work / f"seed{seed}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter()


def wilson(wins: int, games: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    p = wins / games
    centre = (p + z * z / (2 * games)) / (1 + z * z / games)
    half = z * math.sqrt(p * (1 - p) / games + z * z / (4 * games * games)) / (1 + z * z / games)
    return max(0.0, centre - half), min(1.0, centre + half)


async def held_out(model: Path, renderer, games: int) -> dict:
    """Greedy play of ``games`` held-out games (the train command's eval seeds, then more)."""
    import torch

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.engine import SamplingParams
    from miles_envs.loop import LoopConfig, rollout
    from miles_envs.pipeline.engines import DETERMINISTIC_ENGINE
    from miles_envs.pipeline.settings import EVAL_SEED
    from miles_envs.registry import make

    torch.set_num_threads(1)
    engine = EmbeddedEngine.from_path(model, device="cpu", **DETERMINISTIC_ENGINE)
    config = LoopConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=int(flag("--max-new-tokens"))))
    try:
        played = [t async for t in rollout(ENV_ID, engine, renderer, n=games, config=config, seed=EVAL_SEED)]
    finally:
        await engine.close()
    env, by_secret = make(ENV_ID), defaultdict(lambda: [0, 0])
    for t in played:
        env.reset(seed=t.seed)
        by_secret[env.secret][0] += t.reward_components.get("correct", 0.0) == 1.0
        by_secret[env.secret][1] += 1
    wins = sum(won for won, _ in by_secret.values())
    return {
        "games": games, "wins": wins, "win_rate": wins / games, "win_rate_ci95": wilson(wins, games),
        "reward_mean": sum(t.reward for t in played) / games,
        "secrets_won": sorted(s for s, (won, n) in by_secret.items() if won == n),
        "wins_by_secret": {str(s): by_secret[s] for s in sorted(by_secret)},
    }


def evaluate_run(work: Path, seed: int, games: int) -> dict[str, dict]:
    from miles_envs.pipeline.run import model_renderer
    from miles_envs.trainer.checkpoint import latest_checkpoint

    model, checkpoints = work / f"model{seed}", work / f"seed{seed}" / "checkpoints"
    renderer = model_renderer(model)
    models = {"before_warm_start": model, "after_warm_start": checkpoints / "step_000000" / "model",
              "after_rl": latest_checkpoint(checkpoints) / "model"}
    return {phase: asyncio.run(held_out(path, renderer, games)) for phase, path in models.items()}


def train_all(seeds: list[int], work: Path, jobs: int) -> dict[int, dict]:
    """Every seed's run, at most ``jobs`` at once: {seed: metrics.json + cpu_s + wall_s}."""
    pending, running, done = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            proc, started = start_run(work, seed)
            running[proc.pid] = (seed, started)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        seed, started = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"seed {seed} failed: see {work / f'seed{seed}.log'}")
        metrics = json.loads((work / f"seed{seed}" / "metrics.json").read_text())
        metrics["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        metrics["wall_s"] = round(time.perf_counter() - started, 1)
        done[seed] = metrics
    return done


def summarise(runs: dict[int, dict], games: int) -> dict:
    rows = []
    for seed, m in sorted(runs.items()):
        held = m["held_out"]
        rows.append({
            "seed": seed,
            **{phase: held[phase]["win_rate"] for phase in ("before_warm_start", "after_warm_start", "after_rl")},
            "ci95": {phase: held[phase]["win_rate_ci95"] for phase in held},
            "secrets_won": {phase: held[phase]["secrets_won"] for phase in held},
            "rl_lift": held["after_rl"]["win_rate"] - held["after_warm_start"]["win_rate"],
            "rl_lift_outside_intervals": held["after_rl"]["win_rate_ci95"][0] > held["after_warm_start"]["win_rate_ci95"][1],
            "eval_curve": [e["reward_mean"] for e in m["eval"]],
            "cpu_s": m["cpu_s"],
            "wall_s": m["wall_s"],
        })
    lifts = [r["rl_lift"] for r in rows]
    spread = {phase: max(r[phase] for r in rows) - min(r[phase] for r in rows) for phase in ("after_warm_start", "after_rl")}
    return {
        "env_id": ENV_ID,
        "command": f"miles-envs train {ENV_ID} --model M --out O {' '.join(MAIN_JOB_FLAGS)} --seed N (init-model --seed N)",
        "metric": f"games won of {games} held-out games, greedy; Wilson 95% interval",
        "held_out_games": games,
        "cpu_time": "user + system CPU seconds of each run's processes (os.wait4), one thread each",
        "runs": rows,
        "rl_lift_mean": sum(lifts) / len(lifts),
        "rl_lift_min": min(lifts),
        "spread_after_warm_start": spread["after_warm_start"],
        "spread_after_rl": spread["after_rl"],
    }


def readme_section(summary: dict) -> str:
    """The README's demo table and its one-line reading, from ``summary.json``."""
    games = summary["held_out_games"]

    def cell(row: dict, phase: str) -> str:
        low, high = row["ci95"][phase]
        return f"{row[phase]:.2f} [{low:.2f}, {high:.2f}]"

    lines = [
        README_START,
        f"| seed | before warm start | after warm start | after {flag('--steps')} RL steps | RL's lift | secrets found "
        f"(warm start → RL) | eval reward, RL steps 0…{flag('--steps')} | CPU time |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in summary["runs"]:
        found = " → ".join(" ".join(map(str, r["secrets_won"][p])) or "none" for p in ("after_warm_start", "after_rl"))
        curve = " ".join(f"{v:.2f}" for v in r["eval_curve"])
        lines.append(f"| {r['seed']} | {cell(r, 'before_warm_start')} | {cell(r, 'after_warm_start')} | "
                     f"{cell(r, 'after_rl')} | {r['rl_lift']:+.2f} | {found} | {curve} | {r['cpu_s']:.0f} s |")
    outside = sum(r["rl_lift_outside_intervals"] for r in summary["runs"])
    lines += [
        "",
        f"Fraction of {games} held-out games won by the greedy policy, [Wilson 95% interval]; the eval reward "
        f"column is the train command's own greedy eval (mean reward on its {flag('--eval-tasks')} held-out games). "
        f"RL's lift: mean {summary['rl_lift_mean']:+.2f}, smallest {summary['rl_lift_min']:+.2f}, outside both "
        f"intervals on {outside} of {len(summary['runs'])} seeds; spread across seeds "
        f"{summary['spread_after_warm_start']:.2f} after the warm start and {summary['spread_after_rl']:.2f} after RL. "
        f"CPU time: user + system seconds of the run's processes on one thread (about its wall time alone on a free core).",
        "",
        f"![GuessNumber7 learning curves, {len(summary['runs'])} seeds](bench/results/demo/{PNG})",
        README_END,
    ]
    return "\n".join(lines)


def write_readme(readme: Path, summary: dict) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} … {README_END} section to fill")
    head, rest = text.split(README_START, 1)
    readme.write_text(head + readme_section(summary) + rest.split(README_END, 1)[1])


def print_table(summary: dict) -> None:
    print(f"{'seed':>4}  {'before':>17}  {'warm start':>17}  {'after RL':>17}  {'lift':>6}  {'CPU s':>6}")
    for r in summary["runs"]:
        cells = "  ".join(f"{r[p]:.3f} [{r['ci95'][p][0]:.2f},{r['ci95'][p][1]:.2f}]"
                          for p in ("before_warm_start", "after_warm_start", "after_rl"))
        print(f"{r['seed']:>4}  {cells}  {r['rl_lift']:+6.3f}  {r['cpu_s']:6.0f}")
    print(f"RL lift mean {summary['rl_lift_mean']:+.3f}, min {summary['rl_lift_min']:+.3f}; spread across seeds: "
          f"after warm start {summary['spread_after_warm_start']:.3f}, after RL {summary['spread_after_rl']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--eval-games", type=int, default=512, help="held-out games per model for the table")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "demo_lift", help="run folders (not kept in git)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "demo")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="README whose demo section is rewritten")
    parser.add_argument("--stored", action="store_true", help="only rewrite the README section from summary.json")
    args = parser.parse_args()
    for name in ("jobs", "eval_games"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.stored:
        summary = json.loads((args.results / "summary.json").read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        args.results.mkdir(parents=True, exist_ok=True)
        runs = train_all(args.seeds, args.work, args.jobs)
        for seed, metrics in runs.items():
            metrics["held_out"] = evaluate_run(args.work, seed, args.eval_games)
            (args.results / f"seed{seed}.json").write_text(json.dumps(metrics, indent=2))
        summary = summarise(runs, args.eval_games)
        (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
        subprocess.run([cli(), "plot", *(str(args.work / f"seed{s}") for s in args.seeds), "-o", str(args.results / PNG),
                        "--title", f"{ENV_ID}: warm start + GRPO, seeds {' '.join(map(str, args.seeds))}"], check=True)
        print(f"results -> {args.results}")
    print_table(summary)
    write_readme(args.readme, summary)
    print(f"README section -> {args.readme}")


if __name__ == "__main__":
    main()
