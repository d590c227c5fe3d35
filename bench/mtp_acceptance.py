"""MTP-SFT benchmark: speculative accept rate over RL steps, with and without online MTP-SFT.

A tiny Qwen3-MoE with one MTP layer serves rollouts in the embedded engine with MTP speculative
decoding. Its MTP layer is first warm-started by MTP-SFT on the policy's own samples (advantages
are zero, so only the draft learns). Then two runs start from that same checkpoint and do GRPO
against a toy verifiable reward (the share of response tokens whose id is divisible by
``--target-mod``), which moves the policy every step; after each step the weights, MTP layers
included, are synced to the engine, and the next rollout's accept rate measures the draft. One
run trains the MTP layer on every batch (MTP-SFT), the other leaves it frozen.

The MTP layer trains in its own optimizer group at ``--mtp-lr`` (``TrainerConfig.mtp_lr``): at the
policy's lr the draft lags the policy it has to predict (-3.3 points over 30 steps at 5e-3).

The policy learning rate (5e-3) moves the policy enough to age a frozen draft without collapsing
it (at 2e-2 the policy collapsed onto a few tokens, which any draft then predicts); the mean
reward is reported beside the accept rate so a collapse is visible. Start and end are means over
the first and last third of the steps, since a step's accept rate varies by several points.

Random init is nearly uniform over the vocabulary, where any draft is accepted; the LM head is
scaled by ``--head-scale`` so next-token distributions are confident, as in a trained model.
This is a toy (one seed, random-init model): the measurement on a trained MoE is
``bench/gpu/mtp_sft_rl.py``.

    .venv/bin/python bench/mtp_acceptance.py     # prints a table, writes bench/results/mtp_acceptance.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.models.factory import init_model
from miles_envs.trainer import Trainer, TrainerConfig
from miles_envs.trainer.checkpoint import save_checkpoint
from miles_envs.pipeline.records import rollout_metrics
from miles_envs.trajectory import Trajectory, Turn


def confident_model(folder: Path, head_scale: float) -> Path:
    """Scale the tied embedding/LM head in place so the random policy is peaked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(head_scale)
    model.save_pretrained(str(folder))
    return folder


def make_prompts(tasks: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(tasks)]


async def collect(engine: EmbeddedEngine, prompts: list[list[int]], group_size: int, max_new_tokens: int, seed: int, mod: int):
    async def one(task: int, member: int) -> Trajectory:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + task * group_size + member)
        gen = await engine.generate(prompts[task], sampling)
        response = gen.output_ids
        spec = gen.spec
        turn = Turn("model", 0, len(response), gen.finish_reason, gen.weight_version,
                    spec.verify_ct if spec else 0, spec.accepted_tokens if spec else 0, spec.draft_tokens if spec else 0)
        reward = sum(1 for t in response if t % mod == 0) / max(1, len(response))
        return Trajectory(prompts[task], response, [1] * len(response), list(gen.logprobs), turns=[turn],
                          reward=reward, group_id=str(task)).validate()

    jobs = [one(t, m) for t in range(len(prompts)) for m in range(group_size)]
    return list(await asyncio.gather(*jobs))


async def run(folder: Path, args, *, mtp_sft: bool, steps: int, rl: bool, seed: int, label: str, console: Console):
    """``steps`` rollout -> train -> sync steps; returns per-step accept rates and rewards, and the trainer."""
    # warm-up: rewards are zeroed below, so advantages vanish and only the MTP layer learns
    config = TrainerConfig(algo="grpo", lr=args.lr if rl else args.mtp_warmup_lr, mtp_sft=mtp_sft, device=args.device,
                           mtp_lr=args.mtp_lr if rl and mtp_sft else None, mtp_loss_scale=args.mtp_scale, max_row_tokens=1024)
    trainer = Trainer.from_pretrained(str(folder), config)
    engine = EmbeddedEngine.from_path(folder, device=trainer.device, draft_tokens=args.draft_tokens)
    rng = random.Random(seed)
    history = []
    try:
        for step in range(steps):
            prompts = make_prompts(args.tasks, args.prompt_len, engine.model.config.vocab_size, rng)
            trajectories = await collect(engine, prompts, args.group_size, args.max_new_tokens, seed + 1000 * step, args.target_mod)
            accept = rollout_metrics(trajectories).get("rollout/spec_accept_rate", 0.0)
            if not rl:
                for t in trajectories:
                    t.reward = 0.0
            metrics = trainer.train_step(trajectories)
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
            reward = sum(t.reward for t in trajectories) / len(trajectories)
            history.append({"step": step, "accept_rate": accept, "reward": reward, "mtp_loss": metrics.get("mtp/loss")})
            console.print(f"{label}: step {step:2d} accept {accept:.3f} reward {reward:.3f}", markup=False)
    finally:
        await engine.close()
    return history, trainer


def summarize(results: dict[str, list[dict]], steps: int) -> dict[str, dict[str, float]]:
    """Accept rate and reward at the start and end (means over the first/last third of the steps)."""
    k = max(1, steps // 3)

    def mean(values):
        return sum(values) / len(values)

    summary = {}
    for label, history in results.items():
        rates, rewards = [h["accept_rate"] for h in history], [h["reward"] for h in history]
        begin, end = mean(rates[:k]), mean(rates[-k:])
        summary[label] = {"accept_start": begin, "accept_end": end, "change_points": 100 * (end - begin),
                          "reward_start": mean(rewards[:k]), "reward_end": mean(rewards[-k:])}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--draft-tokens", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--mtp-warmup-lr", type=float, default=1e-2)
    parser.add_argument("--mtp-lr", type=float, default=1e-2, help="the MTP layer's lr during RL (MTP-SFT run)")
    parser.add_argument("--mtp-scale", type=float, default=0.2)
    parser.add_argument("--head-scale", type=float, default=10.0)
    parser.add_argument("--target-mod", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mtp_acceptance.json"))
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        base = confident_model(init_model(Path(tmp) / "base", arch="qwen3-moe", size="tiny", mtp=1, seed=args.seed), args.head_scale)
        warmup, warm_trainer = asyncio.run(
            run(base, args, mtp_sft=True, steps=args.warmup_steps, rl=False, seed=args.seed, label="warm-up", console=console)
        )
        start = save_checkpoint(warm_trainer, Path(tmp) / "warm") / "model"
        for file in base.iterdir():  # tokenizer and generation config, which the trainer does not save
            if not (start / file.name).exists():
                (start / file.name).write_bytes(file.read_bytes())
        results = {}
        for label, mtp_sft in (("with_mtp_sft", True), ("without_mtp_sft", False)):
            results[label], _ = asyncio.run(
                run(start, args, mtp_sft=mtp_sft, steps=args.steps, rl=True, seed=args.seed + 1, label=label, console=console)
            )

    summary = summarize(results, args.steps)
    table = Table(title=f"speculative accept rate over {args.steps} GRPO steps (means of the first/last third)")
    for column in ("run", "accept start", "accept end", "change (points)", "reward start", "reward end"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for label, row in summary.items():
        table.add_row(label, f"{row['accept_start']:.3f}", f"{row['accept_end']:.3f}", f"{row['change_points']:+.1f}",
                      f"{row['reward_start']:.3f}", f"{row['reward_end']:.3f}")
    console.print(table)
    machine = {"device": str(warm_trainer.device), "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started}
    report = {"settings": vars(args), "machine": machine, "warmup": warmup, "runs": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
