"""All GPU checks on one trained MoE in one process: pretrain, then R3, MTP-SFT under RL, speculative decoding.

One command, so one machine start pays for everything; each phase writes its own results file as
soon as it ends (a later failure keeps the earlier ones). The pretrained checkpoint is reused
when ``--model-dir`` already holds one made with the same seed and steps.

    python bench/gpu/trained_moe.py --out-dir bench/results                    # the full GPU run
    python bench/gpu/trained_moe.py --tiny --device cpu --out-dir /tmp/gpu-smoke # CPU smoke run
    python bench/gpu/trained_moe.py --phases r3 spec                            # phases on a kept checkpoint

Results: ``gpu_pretrain.json``, ``gpu_r3.json``, ``gpu_mtp_sft.json``, ``gpu_spec_decode.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mtp_sft_rl  # noqa: E402
import pretrain_moe  # noqa: E402
import r3_trained  # noqa: E402
import spec_trained  # noqa: E402
from common import RESULTS, write  # noqa: E402

PHASES = ("pretrain", "r3", "spec", "rl")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pretrain_moe.add_arguments(parser)
    r3_trained.add_arguments(parser)
    spec_trained.add_arguments(parser)
    rl = parser.add_argument_group("rl")
    mtp_sft_rl.add_arguments(rl)
    parser.add_argument("--model-dir", default="/tmp/miles-moe")
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
              "rl": ("gpu_mtp_sft.json", mtp_sft_rl.mtp_report)}
    for name in args.phases:
        if name not in phases:
            continue
        results, run = phases[name]
        try:
            write(out / results, run(folder, args))
            print(f"[{time.perf_counter() - started:.0f}s] {name} done", flush=True)
        except Exception:  # one broken phase must not cost the others their results
            traceback.print_exc()
            print(f"[{time.perf_counter() - started:.0f}s] {name} FAILED", flush=True)
        release_memory()


if __name__ == "__main__":
    main()
