"""The co-evolution examples at a size that learns: self-play tic-tac-toe (two seeds) and
proposer–solver, run side by side on one GPU, each within a time budget.

Each script warm-starts a random-init ``small`` model on scripted demonstrations, then co-evolves,
evaluates on fixed held-out opponents/problems and writes its curves (JSON + PNG) into
``--out-dir``; this command prefixes and collects their output in ``coevolve_run.log`` and writes
the commands, wall times and summaries to ``coevolve_run.json``.

    python bench/gpu/coevolve.py --out-dir bench/results/coevolve --time-budget-s 150
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

COMMON = ["--engine", "embedded", "--size", "small", "--warmup-games", "512", "--warmup-steps", "400",
          "--warmup-lr", "1e-3", "--lr", "1e-4", "--eval-every", "10", "--iterations", "100000"]
RUNS = {
    "selfplay_seed0": ["selfplay_tictactoe.py", "--seed", "0", "--games", "64", "--pool-size", "8",
                       "--eval-games", "256", "--max-new-tokens", "4"],
    "selfplay_seed1": ["selfplay_tictactoe.py", "--seed", "1", "--games", "64", "--pool-size", "8",
                       "--eval-games", "256", "--max-new-tokens", "4"],
    "proposer_solver_seed0": ["proposer_solver.py", "--seed", "0", "--games", "32", "--solvers", "4",
                              "--eval-games", "200", "--max-new-tokens", "24"],
}


# --tiny: the same pipeline at smoke-test size (later flags override earlier ones)
TINY = ["--size", "tiny", "--warmup-games", "4", "--warmup-steps", "2", "--games", "2", "--eval-games", "4", "--eval-every", "1"]


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
        curves = args.out_dir / f"{RUNS[name][0].removesuffix('.py')}_seed{RUNS[name][2]}.json"
        summary = json.loads(curves.read_text())["summary"] if curves.is_file() else None
        record["runs"][name] = {"command": " ".join(command(name, args)[1:]), "returncode": child.returncode,
                                "wall_s": ended.get(name), "summary": summary}
    (args.out_dir / "coevolve_run.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    sys.exit(max(child.returncode for child in children.values()))


if __name__ == "__main__":
    main()
