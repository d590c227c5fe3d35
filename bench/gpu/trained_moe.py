"""All GPU checks on one trained MoE in one command: pretrain, then R3, speculative decoding, MTP-SFT under RL, tool-use RL.

One command, so one machine start pays for everything; each phase writes its own results file as
soon as it ends (a later failure keeps the earlier ones). The pretrained checkpoint is reused
when ``--model-dir`` already holds one made with the same seed and steps. The two RL phases
(``rl``: MTP-SFT arms, ``toolrl``: tool-use GRPO seeds) run at the same time, each seed/arm a
process of its own on the one card; with ``--budget-s`` their RL loops stop in time for the whole
command to end within that many seconds. The speculative-decoding timings run alone.

    python bench/gpu/trained_moe.py --out-dir bench/results                    # the full GPU run
    python bench/gpu/trained_moe.py --tiny --device cpu --out-dir /tmp/gpu-smoke # CPU smoke run
    python bench/gpu/trained_moe.py --phases r3 spec                            # phases on a kept checkpoint

Results: ``gpu_pretrain.json``, ``gpu_r3.json``, ``gpu_spec_decode.json``, ``gpu_mtp_sft.json``, ``gpu_toolrl.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mtp_sft_rl  # noqa: E402
import pretrain_moe  # noqa: E402
import r3_trained  # noqa: E402
import spec_trained  # noqa: E402
import toolrl  # noqa: E402
from common import RESULTS, write  # noqa: E402

PHASES = ("pretrain", "r3", "spec", "rl", "toolrl")
RL_RESERVE_S = {"rl": 75.0, "toolrl": 150.0}  # process start, evals and R3-after-RL around each RL loop


def kept_checkpoint(folder: Path, args) -> bool:
    meta = folder / "miles_envs_model.json"
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    return saved.get("seed") == args.seed and saved.get("size") == args.size and saved.get("steps_planned") == args.steps


def release_memory() -> None:
    """Hand the GPU memory a finished phase cached back, for the next phase (and its processes)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def apply_tiny(args) -> None:
    pretrain_moe.apply_tiny(args)
    if args.tiny:
        args.r3_episodes, args.max_new_tokens, args.r3_seeds = 2, 8, 2
        args.rl_seeds, args.rl_steps, args.tasks, args.group_size, args.window = 2, 2, 2, 2, 1
        args.concurrency, args.new_tokens, args.repeats, args.spec_drafts = [1, 2], 6, 2, [0, 2]
        args.tool_seeds, args.tool_steps, args.tool_tasks, args.tool_group, args.demos = 1, 2, 2, 2, 2
        args.sft_steps, args.sft_batch, args.eval_tasks, args.tool_max_new_tokens = 2, 2, 2, 16


def fit_rl_to_budget(args, elapsed: float) -> None:
    """Cap the RL loops so that the command ends within ``--budget-s`` (RL runs last)."""
    if args.budget_s is None:
        return
    left = args.budget_s - elapsed
    args.rl_time_limit = min(args.rl_time_limit, max(0.0, left - RL_RESERVE_S["rl"]))
    args.tool_time_limit = min(args.tool_time_limit, max(0.0, left - RL_RESERVE_S["toolrl"]))
    print(f"[{elapsed:.0f}s] RL loops capped at {args.rl_time_limit:.0f}s (MTP-SFT arms), {args.tool_time_limit:.0f}s (tool use)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pretrain_moe.add_arguments(parser)
    r3_trained.add_arguments(parser)
    spec_trained.add_arguments(parser)
    rl = parser.add_argument_group("rl")
    mtp_sft_rl.add_arguments(rl)
    toolrl.add_arguments(parser.add_argument_group("toolrl"))
    parser.add_argument("--model-dir", default="/tmp/miles-moe")
    parser.add_argument("--budget-s", type=float, help="seconds the whole command may take; the RL loops are capped to fit")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    apply_tiny(args)
    out = Path(args.out_dir)
    folder = Path(args.model_dir)
    started = time.perf_counter()
    if "pretrain" in args.phases and not kept_checkpoint(folder, args):
        args.out_model = str(folder)
        folder, report = pretrain_moe.pretrain(args)
        write(out / "gpu_pretrain.json", report)
        release_memory()
        print(f"[{time.perf_counter() - started:.0f}s] pretrain done: {report['held_out']['final']}", flush=True)
    phases = {"r3": ("gpu_r3.json", r3_trained.r3_report), "spec": ("gpu_spec_decode.json", spec_trained.spec_report),
              "rl": ("gpu_mtp_sft.json", mtp_sft_rl.mtp_report), "toolrl": ("gpu_toolrl.json", toolrl.toolrl_report)}

    def run_phase(name: str) -> None:
        results, run = phases[name]
        try:
            write(out / results, run(folder, args))
            print(f"[{time.perf_counter() - started:.0f}s] {name} done", flush=True)
        except Exception:  # one broken phase must not cost the others their results
            traceback.print_exc()
            print(f"[{time.perf_counter() - started:.0f}s] {name} FAILED", flush=True)
        release_memory()

    for name in [p for p in args.phases if p in ("r3", "spec")]:
        run_phase(name)
    rl_phases = [p for p in args.phases if p in ("rl", "toolrl")]
    args.partial_dir = args.partial_dir or str(out / "partial")
    fit_rl_to_budget(args, time.perf_counter() - started)
    threads = [threading.Thread(target=run_phase, args=(name,)) for name in rl_phases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if "toolrl" in rl_phases and (out / "gpu_toolrl.json").is_file():
        try:
            toolrl.plot(json.loads((out / "gpu_toolrl.json").read_text()), out / "gpu_toolrl.png")
        except ImportError:
            print("matplotlib missing: plot with `python bench/gpu/toolrl.py --plot gpu_toolrl.json`", flush=True)


if __name__ == "__main__":
    main()
