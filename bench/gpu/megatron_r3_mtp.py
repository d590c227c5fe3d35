"""GPU check of the megatron backend: a small bf16 MoE trained on embedded-engine rollouts, R3 + MTP-SFT on.

A random-init Qwen3-MoE with one MTP layer (sharpened like ``bench/r3_mismatch.py`` so routing
flips move logprobs) rolls out in the embedded engine (bf16, routing traces on). The megatron
trainer (bf16 via Float16Module, DDP + distributed optimizer, RouterReplay, MTP) then

1. measures the rollout/trainer mismatch of one no-grad forward with and without replay;
2. trains ``--steps`` steps, alternating R3 on (routing traces fed) and off (no traces): step
   time, tokens/s, MFU and the R3 overhead as the on/off ratio of the median step times;
3. records the MTP loss of every step (trend of MTP-SFT on the fresh rollouts).

    python bench/gpu/megatron_r3_mtp.py --out bench/results/megatron_r3_mtp.json

Needs a CUDA device, megatron-core and the transformers version the embedded engine is written
for (>= 5.24: older ones lack the MTP weight-conversion API it loads with).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r3_mismatch import PROMPTS, measure, rollout, sharpened_model  # noqa: E402

from miles_envs.agents.embedded import EmbeddedEngine  # noqa: E402
from miles_envs.trainer import TrainerConfig  # noqa: E402
from miles_envs.trainer.megatron.backend import MegatronTrainer  # noqa: E402
from miles_envs.trainer.megatron.model import MegatronSettings  # noqa: E402
from miles_envs.trainer.megatron.parallel import init_parallel  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 TFLOP/s of an H100 SXM (datasheet)


def write_checkpoint(folder: Path, args):
    """A random-init Qwen3-MoE of the requested shape with the qwen3 tokenizer, plus one MTP layer.

    The folder holds the main model only (what the engine rolls out with); the MTP stack stays in
    memory and goes to the trainer with the main weights as ``(hf_config, hf_weights)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from miles_envs.models.factory import init_model
    from miles_envs.models.mtp import build_mtp
    from miles_envs.trainer.megatron.backend import hf_state_of

    init_model(folder, arch="qwen3-moe", size="small", seed=args.seed)
    config = AutoConfig.from_pretrained(folder)
    for key, value in dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        moe_intermediate_size=args.moe_ffn,
        intermediate_size=4 * args.hidden,
    ).items():
        setattr(config, key, value)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder)
    sharpened_model(folder, args.expert_scale, args.head_scale)
    _no_stop_token(folder, config.vocab_size - 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    mtp = build_mtp(model, 1)  # sets num_nextn_predict_layers on the config the trainer builds from
    return model.config, hf_state_of(model, mtp)


def _no_stop_token(folder: Path, stop_id: int) -> None:
    """A random model emits its end-of-turn token within a few steps; stop on the last vocabulary id
    instead (1 in ~150k draws), so responses run to ``--max-new-tokens`` and steps have real length."""
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token_id"] = [stop_id]
        (folder / name).write_text(json.dumps(data, indent=2))


def active_flops_per_token(trainer: MegatronTrainer) -> tuple[float, int, int]:
    """6 x active parameters (experts counted top-k/E; the tied head's matmul counted once)."""
    cfg = trainer.gpt.config
    total = expert = 0
    for name, p in trainer.gpt.named_parameters():
        if name == "embedding.word_embeddings.weight":
            continue  # a lookup; its matmul as the tied output layer is counted below
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    head = trainer.hf_config.vocab_size * cfg.hidden_size * (1 + (cfg.mtp_num_layers or 0))
    active = total - expert + expert * cfg.moe_router_topk / cfg.num_moe_experts + head
    return 6.0 * active, total + trainer.hf_config.vocab_size * cfg.hidden_size, int(active)


def timed_step(trainer: MegatronTrainer, trajectories) -> tuple[float, dict]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = trainer.train_step(trajectories)
    torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--moe-ffn", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (half with R3, half without)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--expert-scale", type=float, default=10.0)
    parser.add_argument("--head-scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "megatron_r3_mtp.json"))
    args = parser.parse_args()

    settings = MegatronSettings(bf16=True, routing_replay=True, mtp_loss_scale=0.2)
    init_parallel(settings, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        hf_config, hf_weights = write_checkpoint(folder, args)
        engine = EmbeddedEngine.from_path(folder, device="cuda", dtype=torch.bfloat16)
        prompts = [
            engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
            for i in range(args.samples)
        ]
        prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]

        async def run():
            try:
                start = time.perf_counter()
                out = await rollout(engine, prompts, args.max_new_tokens, args.seed)
                return out, time.perf_counter() - start
            finally:
                await engine.close()

        trajectories, rollout_s = asyncio.run(run())
        del engine
        torch.cuda.empty_cache()
        # an outcome reward with spread inside each group: the share of even token ids
        trajectories = [
            dataclasses.replace(t, reward=sum(1 for x in t.response_ids if x % 2 == 0) / max(1, len(t.response_ids)))
            for t in trajectories
        ]
        no_trace = [dataclasses.replace(t, routed_experts=None) for t in trajectories]
        config = TrainerConfig(r3=True, mtp_sft=True, dtype="bfloat16", device="cuda", lr=args.lr, max_row_tokens=8192, rows_per_micro_batch=1)
        trainer = MegatronTrainer(hf_config, hf_weights, config, settings)
        del hf_weights

    mismatch = {"without_r3": measure(trainer, trajectories, replay=False), "with_r3": measure(trainer, trajectories, replay=True)}
    flops_per_token, params, active = active_flops_per_token(trainer)
    tokens = sum(len(t.tokens) - 1 for t in trajectories)
    timed_step(trainer, trajectories)  # warm-up, R3 on
    timed_step(trainer, no_trace)  # warm-up, R3 off
    on, off, mtp_loss, history = [], [], [], []
    for step in range(args.steps):
        replay = step % 2 == 0
        seconds, metrics = timed_step(trainer, trajectories if replay else no_trace)
        (on if replay else off).append(seconds)
        mtp_loss.append(metrics.get("mtp/loss"))
        history.append({"r3": replay, "seconds": seconds, **{k: v for k, v in metrics.items() if isinstance(v, float)}})
        print(f"step {step} r3={replay} {seconds * 1e3:.1f} ms mtp/loss={metrics.get('mtp/loss'):.4f} pg_loss={metrics.get('pg_loss'):.4f}")
    t_on, t_off = statistics.median(on), statistics.median(off)
    import megatron.core

    report = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"),
        "model": {
            "arch": "qwen3-moe + 1 MTP layer (random init, sharpened)",
            "hidden": args.hidden, "layers": args.layers, "experts": args.experts, "topk": args.topk,
            "moe_ffn": args.moe_ffn, "params": params, "active_params_per_token": active,
        },
        "precision": "bf16 (Float16Module), distributed optimizer, local spec (no transformer-engine)",
        "rollout": {"samples": len(trajectories), "max_new_tokens": args.max_new_tokens, "seconds": rollout_s,
                    "engine": "embedded, bf16"},
        "response_tokens_mean": sum(len(t.response_ids) for t in trajectories) / len(trajectories),
        "tokens_per_step": tokens,
        "step_seconds_r3_on_median": t_on,
        "step_seconds_r3_off_median": t_off,
        "r3_overhead_ratio": t_on / t_off,
        "tokens_per_second_r3_on": tokens / t_on,
        "mfu_r3_on": flops_per_token * tokens / t_on / H100_BF16_PEAK,
        "mfu_note": "6 x active params x tokens per step (attention score FLOPs excluded) / 989 TFLOP/s",
        "mismatch": mismatch,
        "k3_kl_reduction": mismatch["without_r3"]["k3_kl"] / max(mismatch["with_r3"]["k3_kl"], 1e-30),
        "mtp_loss_per_step": mtp_loss,
        "steps": history,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2))


if __name__ == "__main__":
    main()
