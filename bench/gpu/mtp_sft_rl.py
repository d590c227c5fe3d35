"""Online MTP-SFT on the pretrained MoE: speculative accept rate over RL steps, with vs without.

Each arm is one GRPO run on GuessNumber-v0 (multi-turn) from the pretrained checkpoint: every step
plays fresh episodes through the env loop with the embedded engine (bf16, MTP speculative decoding
with ``--draft-tokens`` drafts, routing traces on), trains one step (fp32 trainer, R3 on), and
syncs the weights, MTP layer included, to the engine. The "with" arm trains the MTP layer on
every batch (MTP-SFT at ``--mtp-lr``); the "without" arm leaves it as pretrained. Both arms of a
seed see the same env seeds and sampling seeds. The accept rate of step ``s`` is measured on
step ``s``'s own rollouts (accepted drafts / drafted tokens), so it scores the draft against
the policy of that moment.

Arms run as separate processes on the one GPU (``--parallel``), since each is bound by Python
and kernel launches. After its last step each arm also measures R3 on its moved policy (fresh
rollouts, see ``r3_trained.py``).

Summary per condition over seeds: accept rate at the start and end (means over the first and
last ``--window`` steps), the change in points, its mean and 95% t-interval, and the paired
difference of the changes (with minus without).

    python bench/gpu/mtp_sft_rl.py --model /tmp/miles-moe     # writes bench/results/gpu_mtp_sft.json
    python bench/gpu/mtp_sft_rl.py --summarize FILE           # recompute a results file's summary from its runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, mean_ci, write  # noqa: E402

ENV = "miles/GuessNumber-v0"


def arm(job: tuple) -> dict:
    """One RL run (one seed, one condition): its per-step history and R3-after-RL row, or its error."""
    folder, seed, with_sft, args = job
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # six arms share one card
    torch.set_num_threads(2)  # arms share the host's cores too
    try:
        return asyncio.run(_arm(Path(folder), seed, with_sft, args))
    except Exception:  # one failed arm must not cost the others their results
        return {"seed": seed, "mtp_sft": with_sft, "steps": [], "error": traceback.format_exc(limit=3)}


async def _arm(folder: Path, seed: int, with_sft: bool, args) -> dict:
    import r3_trained

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.engine import SamplingParams
    from miles_envs.loop import LoopConfig, rollout
    from miles_envs.models.factory import save_folder
    from miles_envs.trainer import Trainer, TrainerConfig
    from miles_envs.pipeline.records import rollout_metrics

    label = f"{'with' if with_sft else 'without'}_mtp_sft seed {seed}"
    config = TrainerConfig(algo="grpo", lr=args.rl_lr, r3=True, mtp_sft=with_sft, mtp_lr=args.mtp_lr if with_sft else None,
                           device=args.device, dtype="float32", max_row_tokens=args.rl_row_tokens, seed=seed)
    trainer = Trainer.from_pretrained(str(folder), config, experts_implementation="eager")
    engine = EmbeddedEngine.from_path(folder, device=args.device, dtype=torch.bfloat16, draft_tokens=args.draft_tokens,
                                      max_running=args.tasks * args.group_size)
    renderer = r3_trained.renderer_for(engine)
    history = []
    started = time.perf_counter()
    try:
        for step in range(args.rl_steps):
            if time.perf_counter() - started > args.rl_time_limit:
                break
            loop_config = LoopConfig(
                sampling=SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=(seed * 1000 + step) * 4096),
                return_routed_experts=True, max_context=4096, max_loop_lag=None,
            )
            trajectories = await asyncio.wait_for(collect(rollout(ENV, engine, renderer, n=args.tasks, group_size=args.group_size,
                                                                  config=loop_config, seed=(seed * 1000 + step) * 100)), 300)
            accepted = sum(turn.spec_accepted_tokens for t in trajectories for turn in t.turns)
            verify = sum(turn.spec_verify_ct for t in trajectories for turn in t.turns)
            metrics = trainer.train_step(trajectories)
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
            row = {
                "step": step,
                "accept_rate": rollout_metrics(trajectories).get("rollout/spec_accept_rate", 0.0),
                "accept_length": (accepted + verify) / max(1, verify),
                "reward": sum(t.reward for t in trajectories) / len(trajectories),
                "model_tokens": int(sum(t.num_model_tokens for t in trajectories)),
                **{k: metrics[k] for k in ("mtp/loss", "mtp/accuracy", "mismatch/k3_kl", "mismatch/router_disagreement",
                                            "entropy", "grad_norm") if k in metrics},
            }
            history.append(row)
            if args.partial_dir:  # what a killed run still leaves behind
                write(Path(args.partial_dir) / f"mtp_sft_{label.replace(' ', '_')}.json", {"seed": seed, "mtp_sft": with_sft, "steps": history})
            print(f"{label}: step {step:2d} accept {row['accept_rate']:.3f} len {row['accept_length']:.2f} "
                  f"reward {row['reward']:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
        r3_after = None
        if args.r3_after:
            with tempfile.TemporaryDirectory() as tmp:
                moved = save_folder(Path(tmp) / "moved", trainer.model, trainer.mtp, "qwen3", {"rl_steps": len(history)})
                trainers = r3_trained.load_trainers(moved, args.device)
                rows = await r3_trained.run_seeds(engine, trainers, [10_000 + seed], args.r3_episodes, args.max_new_tokens,
                                                  f"after RL ({label})")
                r3_after = rows[0]
    finally:
        await engine.close()
    return {"seed": seed, "mtp_sft": with_sft, "steps": history, "r3_after_rl": r3_after,
            "wall_s": round(time.perf_counter() - started, 1)}


async def collect(trajectories) -> list:
    return [t async for t in trajectories]


def change(history: list[dict], key: str, window: int, steps: int) -> tuple[float, float]:
    values = [h[key] for h in history[:steps]]
    start, end = sum(values[:window]) / window, sum(values[-window:]) / window
    return start, end


def summarize(runs: list[dict], window: int) -> dict:
    """Over the seeds whose two arms both ran: start/end/change per condition and the paired gap."""
    done = {(r["seed"], r["mtp_sft"]) for r in runs if r["steps"]}
    runs = [r for r in runs if (r["seed"], True) in done and (r["seed"], False) in done]
    if not runs:
        return {"steps_compared": 0, "error": "no seed has both arms with at least one step"}
    steps = min(len(r["steps"]) for r in runs)
    window = max(1, min(window, steps // 2))
    summary: dict = {"steps_compared": steps, "window": window}
    by_seed: dict[str, dict[int, float]] = {"with": {}, "without": {}}
    for condition in ("with", "without"):
        chosen = [r for r in runs if r["mtp_sft"] == (condition == "with")]
        entry = {}
        for key in ("accept_rate", "accept_length", "reward"):
            starts, ends = zip(*(change(r["steps"], key, window, steps) for r in chosen))
            entry[key] = {"start": mean_ci(list(starts)), "end": mean_ci(list(ends)),
                          "change": mean_ci([e - s for s, e in zip(starts, ends)])}
        by_seed[condition] = {r["seed"]: entry_change for r, entry_change in
                              zip(chosen, [e - s for s, e in (change(r["steps"], "accept_rate", window, steps) for r in chosen)])}
        entry["accept_rate_per_step"] = mean_curve([r["steps"][:steps] for r in chosen], "accept_rate")
        summary[f"{condition}_mtp_sft"] = entry
    paired = [by_seed["with"][s] - by_seed["without"][s] for s in by_seed["with"] if s in by_seed["without"]]
    summary["accept_change_gap_with_minus_without"] = mean_ci(paired) if len(paired) > 1 else None
    summary["r3_after_rl"] = r3_after_rl(runs)
    return summary


def r3_after_rl(runs: list[dict]) -> dict | None:
    """R3 on the policies RL moved: every arm's after-RL row (one per arm, arms as repeats)."""
    import r3_trained

    rows = [r["r3_after_rl"] for r in runs if r.get("r3_after_rl")]
    return r3_trained.summarize(rows) if len(rows) > 1 else None


def mean_curve(histories: list[list[dict]], key: str) -> list[dict]:
    return [{"step": i, **{k: v for k, v in mean_ci([h[i][key] for h in histories]).items() if k in ("mean", "ci95")}}
            for i in range(len(histories[0]))]


def mtp_report(folder: Path, args) -> dict:
    jobs = [(str(folder), seed, with_sft, args) for seed in range(args.rl_seeds) for with_sft in (True, False)]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what earlier phases cached in this process, the arms need
    if args.parallel:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            runs = pool.map(arm, jobs)
    else:
        runs = [arm(job) for job in jobs]
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(folder),
        "settings": {k: getattr(args, k) for k in ("rl_seeds", "rl_steps", "tasks", "group_size", "draft_tokens", "rl_lr",
                                                   "mtp_lr", "max_new_tokens", "window", "rl_time_limit")},
        "env": ENV,
        "runs": runs,
        "summary": summarize(runs, args.window),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rl-seeds", type=int, default=3)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--draft-tokens", type=int, default=2)
    parser.add_argument("--rl-lr", type=float, default=5e-5)
    parser.add_argument("--mtp-lr", type=float, default=1e-4)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--rl-row-tokens", type=int, default=2048, help="tokens per packed trainer row")
    parser.add_argument("--rl-time-limit", type=float, default=math.inf, help="seconds per arm at most (with trained_moe.py --budget-s: fitted to the budget)")
    parser.add_argument("--r3-after", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--partial-dir", help="each arm rewrites its history here after every step")


def main() -> None:
    import r3_trained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder written by pretrain_moe.py")
    parser.add_argument("--summarize", metavar="RESULTS", help="recompute the summary of a results file from its runs, in place")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "gpu_mtp_sft.json"))
    add_arguments(parser)
    r3_trained.add_arguments(parser)
    args = parser.parse_args()
    if args.summarize:
        if not Path(args.summarize).is_file():
            parser.error(f"--summarize {args.summarize}: no such results file (one written by this script)")
        report = json.loads(Path(args.summarize).read_text())
        report["summary"] = summarize(report["runs"], report["settings"]["window"])
        print(f"wrote {write(args.summarize, report)}")
        return
    if not args.model:
        parser.error("--model is required (or --summarize RESULTS)")
    report = mtp_report(Path(args.model), args)
    print(f"wrote {write(args.out, report)}")


if __name__ == "__main__":
    main()
