"""The README main job over several seeds: greedy eval before the warm start, after it, and after RL.

Runs ``miles-envs init-model`` and ``miles-envs train`` (the README's flags, ``MAIN_JOB_FLAGS``) once
per seed as separate processes, each on one thread, side by side; per-run CPU time comes from
``os.wait4`` (user + system of that process alone, so runs sharing the machine do not inflate each
other's figure). Writes ``RESULTS/seed{N}.json`` (the run's ``metrics.json`` plus its CPU and wall
time), ``RESULTS/summary.json`` (the table, with RL's lift and the seed spread) and
``RESULTS/guess_number7_curves.png`` (``miles-envs plot`` of all runs), and prints the table.

    python bench/demo_lift.py                      # seeds 0 1 2 -> bench/results/demo/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ENV_ID = "miles/GuessNumber7-v0"
# The README's `miles-envs train` command, less --model/--out/--seed.
MAIN_JOB_FLAGS = (
    "--sft-warmup", "150", "--sft-lr", "5e-3", "--steps", "40", "--lr", "2e-3", "--tasks-per-step", "8",
    "--group-size", "8", "--max-new-tokens", "4", "--eval-every", "10", "--eval-tasks", "64",
)
REPO = Path(__file__).resolve().parents[1]


def cli() -> str:
    return str(Path(sys.executable).with_name("miles-envs"))


def start_run(work: Path, seed: int) -> tuple[subprocess.Popen, float, Path]:
    """init-model then train for one seed, as one shell process (its children's CPU time is its own)."""
    model, out = work / f"model{seed}", work / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    init = [cli(), "init-model", str(model), "--arch", "qwen3", "--size", "tiny", "--tokenizer", "qwen3", "--seed", str(seed)]
    train = [cli(), "train", ENV_ID, "--model", str(model), "--out", str(out), *MAIN_JOB_FLAGS, "--seed", str(seed),
             "--device", "cpu"]
    script = f"{subprocess.list2cmdline(init)} && {subprocess.list2cmdline(train)}"
    log = (work / f"seed{seed}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter(), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "demo_lift", help="run folders (not kept in git)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "demo")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    running = {}
    for seed in args.seeds:
        proc, started, out = start_run(args.work, seed)
        running[proc.pid] = (seed, started, out)
    rows = []
    while running:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        seed, started, out = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"seed {seed} failed: see {args.work / f'seed{seed}.log'}")
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        metrics["wall_s"] = round(time.perf_counter() - started, 1)
        (args.results / f"seed{seed}.json").write_text(json.dumps(metrics, indent=2))
        rows.append({
            "seed": seed,
            "before_warm_start": metrics["eval_reward_before_warmup"],
            "after_warm_start": metrics["eval_reward_rl_start"],
            "after_rl": metrics["eval_reward_end"],
            "rl_lift": metrics["eval_reward_end"] - metrics["eval_reward_rl_start"],
            "eval_curve": [e["reward_mean"] for e in metrics["eval"]],
            "cpu_s": metrics["cpu_s"],
            "wall_s": metrics["wall_s"],
        })
    rows.sort(key=lambda r: r["seed"])
    lifts = [r["rl_lift"] for r in rows]
    warm = [r["after_warm_start"] for r in rows]
    summary = {
        "env_id": ENV_ID,
        "command": f"miles-envs train {ENV_ID} --model M --out O {' '.join(MAIN_JOB_FLAGS)} --seed N (init-model --seed N)",
        "cpu_time": "user + system CPU seconds of each run's processes (os.wait4), one thread each",
        "runs": rows,
        "rl_lift_mean": sum(lifts) / len(lifts),
        "rl_lift_min": min(lifts),
        "after_warm_start_spread": max(warm) - min(warm),
        "after_rl_spread": max(r["after_rl"] for r in rows) - min(r["after_rl"] for r in rows),
    }
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
    png = args.results / "guess_number7_curves.png"
    subprocess.run([cli(), "plot", *(str(args.work / f"seed{s}") for s in args.seeds), "-o", str(png),
                    "--title", f"{ENV_ID}: warm start + GRPO, seeds {' '.join(map(str, args.seeds))}"], check=True)

    print(f"{'seed':>4}  {'before':>7}  {'warm':>7}  {'after RL':>8}  {'lift':>6}  {'CPU s':>6}  eval every 10 steps")
    for r in rows:
        curve = " ".join(f"{v:.2f}" for v in r["eval_curve"])
        print(f"{r['seed']:>4}  {r['before_warm_start']:7.2f}  {r['after_warm_start']:7.2f}  {r['after_rl']:8.2f}  "
              f"{r['rl_lift']:+6.2f}  {r['cpu_s']:6.0f}  {curve}")
    print(f"RL lift mean {summary['rl_lift_mean']:+.3f}, min {summary['rl_lift_min']:+.3f}; spread across seeds: "
          f"after warm start {summary['after_warm_start_spread']:.3f}, after RL {summary['after_rl_spread']:.3f}")
    print(f"results -> {args.results}")


if __name__ == "__main__":
    main()
