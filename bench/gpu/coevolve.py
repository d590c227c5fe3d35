"""The co-evolution examples at a size that learns: self-play tic-tac-toe (two seeds) and
proposer–solver, run side by side on one GPU, each within a time budget.

Each script warm-starts a random-init ``small`` model on scripted demonstrations, then co-evolves,
evaluates on fixed held-out opponents/problems and writes its curves (JSON + PNG) into
``--out-dir``; this command prefixes and collects their output in ``coevolve_run.log`` and writes
the commands, wall times and summaries to ``coevolve_run.json``.

    python bench/gpu/coevolve.py --out-dir bench/results/coevolve --time-budget-s 175
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "coevolve"

# Self-play at lr 1e-4, two optimizer steps per 128-game batch and pool opponents only lifted
# win+draw vs random by +19 and -6 points on two seeds in 25 iterations: the policy's entropy fell
# from 0.9 to 0.4-0.6 and on one seed the greedy learner lost nearly every game to the one-ply player
# (0.30 -> 0.07), a line of play its own past versions fell for. Here: half the training games
# against the random-legal player (a fixed league member), an entropy bonus, and 256 games per
# iteration (two steps of 128), which costs the GPU about what 64 games do (the games decode as one
# batch). Proposer-solver on problems of 1-2 operators, where the warm-started solver gets a share
# right, so its 8-solver GRPO groups have signal; its entropy stayed near 1.1 at lr 1e-4 and the
# held-out accuracy barely moved (+3 points in 29 iterations), so it runs at lr 3e-4.
COMMON = ["--engine", "embedded", "--size", "small", "--warmup-lr", "1e-3", "--minibatches", "2",
          "--iterations", "100000", "--concurrency", "256"]
SELFPLAY = ["selfplay_tictactoe.py", "--lr", "1e-4", "--entropy-coef", "0.01", "--games", "256", "--random-share", "0.5",
            "--pool-size", "8", "--pool-hardness", "1", "--greedy-too",
            "--warmup-games", "512", "--warmup-steps", "400", "--eval-games", "256", "--mid-eval-games", "128",
            "--eval-every", "5", "--max-new-tokens", "4"]
RUNS = {
    "selfplay_seed0": [*SELFPLAY, "--seed", "0"],
    "selfplay_seed1": [*SELFPLAY, "--seed", "1"],
    # one distinct problem per demonstration (4096), each solver answer graded (GRPO group of 8 per problem)
    "proposer_solver_seed0": ["proposer_solver.py", "--lr", "3e-4", "--games", "64", "--solvers", "8", "--max-operators", "2",
                              "--warmup-games", "4096", "--warmup-steps", "800", "--warmup-batch", "32",
                              "--eval-games", "400", "--mid-eval-games", "100", "--eval-every", "5",
                              "--max-new-tokens", "24", "--seed", "0"],
}


# --tiny: the same pipeline at smoke-test size (later flags override earlier ones)
TINY = ["--size", "tiny", "--warmup-games", "4", "--warmup-steps", "2", "--games", "2", "--eval-games", "4",
        "--mid-eval-games", "2", "--eval-every", "1"]


def command(name: str, args: argparse.Namespace) -> list[str]:
    script, *rest = RUNS[name]
    return [sys.executable, str(EXAMPLES.relative_to(REPO) / script), *COMMON, *rest, *(TINY if args.tiny else []),
            "--device", args.device, "--time-budget-s", str(args.time_budget_s),
            "--out", str(args.work_dir / name), "--results", str(args.out_dir.resolve())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "coevolve")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/coevolve_runs"), help="run folders (trajectories, models)")
    parser.add_argument("--time-budget-s", type=float, default=150.0, help="per run, warm start included")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--tiny", action="store_true", help="smoke-test size (CPU)")
    args = parser.parse_args()
    if not args.time_budget_s > 0:
        parser.error(f"--time-budget-s {args.time_budget_s}: must be above 0 (seconds per run)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "OMP_NUM_THREADS": "4", "HF_HUB_OFFLINE": "1"}
    log = (args.out_dir / "coevolve_run.log").open("w", buffering=1)
    lock = threading.Lock()
    started = time.perf_counter()
    children = {name: subprocess.Popen(command(name, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
                for name in args.runs}
    ended: dict[str, float] = {}

    def pump(name: str, child: subprocess.Popen) -> None:
        for line in child.stdout:
            if "Loading weights" in line or "Writing model shards" in line:
                continue
            with lock:
                log.write(f"[{name}] {line}")
                print(f"[{name}] {line}", end="", flush=True)
        child.wait()
        ended[name] = round(time.perf_counter() - started, 1)

    threads = [threading.Thread(target=pump, args=item) for item in children.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = {"device": args.device, "time_budget_s": args.time_budget_s, "runs": {}}
    for name, child in children.items():
        seed = RUNS[name][RUNS[name].index("--seed") + 1]
        curves = args.out_dir / f"{RUNS[name][0].removesuffix('.py')}_seed{seed}.json"
        summary = json.loads(curves.read_text())["summary"] if curves.is_file() else None
        record["runs"][name] = {"command": " ".join(command(name, args)[1:]), "returncode": child.returncode,
                                "wall_s": ended.get(name), "summary": summary}
    (args.out_dir / "coevolve_run.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    sys.exit(max(child.returncode for child in children.values()))


if __name__ == "__main__":
    main()
