"""R3 on the pretrained MoE, no weight scaling: rollout/trainer mismatch with and without routing replay.

Rollouts are real env episodes (GuessNumber, ToolCalc, Echo) played through the env loop by the
embedded engine in bf16 at temperature 1, routing traces on. The trainer recomputes the logprobs
of the same tokens in one forward, in bf16 (same grouped expert kernels as the engine) and in
fp32 (per-expert loop), each with and without replaying the rollout's experts. Per seed (fresh
rollouts) it reports k3-KL, the share of tokens with |Δlogprob| > ln 2, mean |Δlogprob| and the
router disagreement (share of token x layer pairs whose live top-k set differs from the
rollout's); across seeds the mean with a 95% t-interval, and the k3-KL reduction (without/with)
as a geometric mean over seeds with its interval.

    python bench/gpu/r3_trained.py --model /tmp/miles-moe          # writes bench/results/gpu_r3.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, mean_ci, ratio_ci, write  # noqa: E402

from miles_envs.engine import SamplingParams  # noqa: E402
from miles_envs.loop import LoopConfig, rollout  # noqa: E402
from miles_envs.trainer import Trainer, TrainerConfig, pack  # noqa: E402
from miles_envs.trainer.r3 import RoutingRecord, mismatch_metrics  # noqa: E402

ENVS = {"miles/GuessNumber-v0": 1.0, "miles/ToolCalc-v0": 1.0, "miles/Echo-v0": 0.5}
METRICS = ("k3_kl", "extreme_frac", "mean_abs_delta", "router_disagreement")
TRAINERS = {"bf16": ("bfloat16", None), "fp32": ("float32", "eager")}


def renderer_for(engine):
    from miles_envs.chat.renderer import ChatRenderer

    return ChatRenderer(engine.tokenizer)


async def env_rollouts(engine, episodes: int, seed: int, max_new_tokens: int, *, draft: bool = False) -> list:
    """``episodes`` episodes per unit weight of ``ENVS``, sampled at T=1 with routing traces."""
    renderer = renderer_for(engine)
    config = LoopConfig(sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed * 1_000_003),
                        return_routed_experts=True, max_context=4096, max_loop_lag=None)
    trajectories = []
    for index, (env_id, weight) in enumerate(ENVS.items()):
        async for trajectory in rollout(env_id, engine, renderer, n=max(1, int(episodes * weight)), config=config,
                                        seed=seed * 100_003 + index * 10_007, concurrency=256):
            trajectories.append(trajectory)
    usable = [t for t in trajectories if t.routed_experts is not None and t.num_model_tokens]
    return usable


def load_trainers(folder: str | Path, device: str) -> dict[str, Trainer]:
    trainers = {}
    for name, (dtype, experts) in TRAINERS.items():
        kwargs = {"experts_implementation": experts} if experts else {}
        trainers[name] = Trainer.from_pretrained(str(folder), TrainerConfig(device=device, dtype=dtype), **kwargs)
        trainers[name].model.eval()
    return trainers


@torch.no_grad()
def mismatch(trainer: Trainer, trajectories: list, replay: bool) -> dict[str, float]:
    """One no-grad trainer forward over the rollout tokens; Δ = trainer − rollout logprob."""
    n = len(trajectories)
    trainer_lp, rollout_lp, routing = [], [], RoutingRecord()
    for batch in pack(trajectories, [0.0] * n, [1.0] * n, max_row_tokens=8192):
        batch = batch.to(trainer.device)
        result = trainer.forward(batch, replay=replay)
        mask = batch.loss_mask.bool()
        trainer_lp.append(result.logprobs[mask].float().cpu())
        rollout_lp.append(batch.rollout_logprobs[mask].cpu())
        routing.merge(result.routing)
    trainer_lp, rollout_lp = torch.cat(trainer_lp), torch.cat(rollout_lp)
    return {**mismatch_metrics(trainer_lp, rollout_lp, torch.ones_like(trainer_lp)), "router_disagreement": routing.disagreement}


def measure_seed(trainers: dict[str, Trainer], trajectories: list) -> dict:
    row = {"episodes": len(trajectories), "response_tokens": int(sum(t.num_model_tokens for t in trajectories))}
    for name, trainer in trainers.items():
        for replay in (False, True):
            row[f"{name}_{'with' if replay else 'without'}_r3"] = mismatch(trainer, trajectories, replay)
    return row


def summarize(rows: list[dict]) -> dict:
    """Across seeds: each metric's mean and 95% CI, and the k3-KL reduction per trainer precision."""
    summary = {}
    for name in TRAINERS:
        for arm in ("without_r3", "with_r3"):
            key = f"{name}_{arm}"
            summary[key] = {metric: mean_ci([row[key][metric] for row in rows]) for metric in METRICS}
        summary[f"{name}_k3_kl_reduction"] = ratio_ci(
            [row[f"{name}_without_r3"]["k3_kl"] for row in rows], [row[f"{name}_with_r3"]["k3_kl"] for row in rows]
        )
    summary["response_tokens_per_seed"] = [row["response_tokens"] for row in rows]
    return summary


async def run_seeds(engine, trainers, seeds: list[int], episodes: int, max_new_tokens: int, label: str) -> list[dict]:
    rows = []
    for seed in seeds:
        trajectories = await env_rollouts(engine, episodes, seed, max_new_tokens)
        row = {"seed": seed, **measure_seed(trainers, trajectories)}
        rows.append(row)
        print(f"r3 {label} seed {seed}: {row['response_tokens']} tokens; k3 bf16 {row['bf16_without_r3']['k3_kl']:.2e} -> "
              f"{row['bf16_with_r3']['k3_kl']:.2e}, fp32 {row['fp32_without_r3']['k3_kl']:.2e} -> {row['fp32_with_r3']['k3_kl']:.2e}; "
              f"disagreement {row['fp32_without_r3']['router_disagreement']:.3f}", flush=True)
    return rows


def r3_report(folder: Path, args) -> dict:
    from miles_envs.agents.embedded import EmbeddedEngine

    trainers = load_trainers(folder, args.device)
    engine = EmbeddedEngine.from_path(folder, device=args.device, dtype=torch.bfloat16, max_running=args.max_running)

    async def go():
        try:
            return await run_seeds(engine, trainers, list(range(args.r3_seeds)), args.r3_episodes, args.max_new_tokens, "pretrained")
        finally:
            await engine.close()

    rows = asyncio.run(go())
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(folder),
        "rollout": {"engine": "embedded, bfloat16, grouped experts", "temperature": 1.0, "envs": ENVS,
                    "episodes_per_unit_weight": args.r3_episodes, "max_new_tokens_per_turn": args.max_new_tokens},
        "trainers": {name: {"dtype": dtype, "experts": experts or "grouped_mm"} for name, (dtype, experts) in TRAINERS.items()},
        "seeds": rows,
        "summary": summarize(rows),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--r3-seeds", type=int, default=3)
    parser.add_argument("--r3-episodes", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-running", type=int, default=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder written by pretrain_moe.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "gpu_r3.json"))
    add_arguments(parser)
    args = parser.parse_args()
    report = r3_report(Path(args.model), args)
    print(f"wrote {write(args.out, report)}")


if __name__ == "__main__":
    main()
