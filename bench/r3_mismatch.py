"""R3 benchmark: rollout/trainer mismatch with and without Rollout Routing Replay, on one batch.

The rollout runs in the embedded engine in bf16 (as an inference server would), the trainer
recomputes logprobs in fp32. A random-init tiny MoE has near-tied router scores, so bf16 noise
flips expert choices and the trainer's logprobs drift from the rollout's. With R3 the trainer uses
the rollout's experts and only the dense numerics differ.

Plain random init is nearly uniform over the vocabulary and its experts barely touch the residual
stream, so nothing it does changes a logprob measurably. The default checkpoint is therefore
sharpened like a trained model: expert weights x``--expert-scale`` (experts dominate the MLP
output) and the tied embedding/LM head x``--head-scale`` (confident next-token distributions).
How much a routing flip moves a logprob depends on these scales, so the absolute numbers (and
the ratio) are properties of this toy, not a prediction for a real model: the measurement on a
trained MoE is ``bench/gpu/r3_trained.py``.

    .venv/bin/python bench/r3_mismatch.py            # prints a table, writes bench/results/r3_mismatch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.models.factory import init_model
from miles_envs.trainer import Trainer, TrainerConfig, pack
from miles_envs.trainer.r3 import RoutingRecord, mismatch_metrics
from miles_envs.trajectory import Trajectory

PROMPTS = [
    "Write a haiku about gradient descent.",
    "List three prime numbers and explain why they are prime.",
    "What is the capital of France? Answer briefly.",
    "Describe a mixture-of-experts layer in one paragraph.",
]
METRICS = ("k3_kl", "extreme_frac", "mean_abs_delta", "router_disagreement")


async def rollout(engine: EmbeddedEngine, prompt_ids: list[list[int]], max_new_tokens: int, seed: int) -> list[Trajectory]:
    async def one(i: int, ids: list[int]) -> Trajectory:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + i)
        gen = await engine.generate(ids, sampling, return_routed_experts=True)
        return Trajectory(
            prompt_ids=ids,
            response_ids=gen.output_ids,
            loss_mask=[1] * len(gen.output_ids),
            logprobs=list(gen.logprobs),
            routed_experts=gen.routed_experts,
            group_id=str(i % len(PROMPTS)),
        ).validate()

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids))))


@torch.no_grad()
def measure(trainer: Trainer, trajectories: list[Trajectory], replay: bool) -> dict[str, float]:
    batches = [b.to(trainer.device) for b in pack(trajectories, [0.0] * len(trajectories), [1.0] * len(trajectories))]
    trainer_lp, rollout_lp, routing = [], [], RoutingRecord()
    for batch in batches:
        result = trainer.forward(batch, replay=replay)
        mask = batch.loss_mask.bool()
        trainer_lp.append(result.logprobs[mask].cpu())
        rollout_lp.append(batch.rollout_logprobs[mask].cpu())
        routing.merge(result.routing)
    trainer_lp, rollout_lp = torch.cat(trainer_lp), torch.cat(rollout_lp)
    return {**mismatch_metrics(trainer_lp, rollout_lp, torch.ones_like(trainer_lp)), "router_disagreement": routing.disagreement}


def sharpened_model(folder: Path, expert_scale: float, head_scale: float) -> Path:
    """Rescale a random-init checkpoint in place (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                param.mul_(expert_scale)
            elif name == "model.embed_tokens.weight":  # tied with lm_head
                param.mul_(head_scale)
    model.save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a fresh random-init tiny qwen3-moe)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rollout-dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expert-scale", type=float, default=10.0)
    parser.add_argument("--head-scale", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "r3_mismatch.json"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
        else:
            folder = init_model(Path(tmp) / "model", arch="qwen3-moe", size=args.size, seed=args.seed)
            sharpened_model(folder, args.expert_scale, args.head_scale)
        trainer = Trainer.from_pretrained(str(folder), TrainerConfig(device=args.device, dtype="float32"))
        engine = EmbeddedEngine.from_path(folder, device=trainer.device, dtype=getattr(torch, args.rollout_dtype))
        tokenizer = engine.tokenizer
        prompt_ids = [
            tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
            for i in range(args.samples)
        ]
        prompt_ids = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompt_ids]

        async def run() -> list[Trajectory]:
            try:
                return await rollout(engine, prompt_ids, args.max_new_tokens, args.seed)
            finally:
                await engine.close()

        trajectories = asyncio.run(run())
        results = {"without_r3": measure(trainer, trajectories, replay=False), "with_r3": measure(trainer, trajectories, replay=True)}

    ratio = results["without_r3"]["k3_kl"] / max(results["with_r3"]["k3_kl"], 1e-30)
    table = Table(title=f"R3 mismatch: rollout {args.rollout_dtype} (embedded engine) vs trainer float32")
    table.add_column("metric")
    table.add_column("without R3", justify="right")
    table.add_column("with R3", justify="right")
    table.add_column("ratio", justify="right")
    for name in METRICS:
        off, on = results["without_r3"][name], results["with_r3"][name]
        table.add_row(name, f"{off:.3e}", f"{on:.3e}", f"{off / on:.1f}x" if on else "-")
    console = Console()
    console.print(table)
    tokens = int(sum(t.num_model_tokens for t in trajectories))
    console.print(f"k3_kl reduction with R3: {ratio:.1f}x over {tokens} model tokens of {len(trajectories)} trajectories")
    report = {
        "model": args.model
        or f"random-init qwen3-moe {args.size}, experts x{args.expert_scale}, embedding/head x{args.head_scale}",
        "rollout_dtype": args.rollout_dtype,
        "trainer_dtype": "float32",
        "device": str(trainer.device),
        "samples": len(trajectories),
        "model_tokens": tokens,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        **results,
        "k3_kl_reduction": ratio,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
