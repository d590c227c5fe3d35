"""Pretrain a small Qwen3-MoE with one MTP layer from scratch on the corpus the repo generates.

The GPU checks need a *trained* MoE (specialised routers, an MTP head that guesses right a
realistic share of the time) and none can be downloaded. Shape ``medium`` (8 layers, hidden 512,
32 experts top-4, expert FFN 256, one MTP layer; the real Qwen3 vocabulary) is trained on
``corpus.py``'s documents: next-token loss + the load-balancing loss + 0.3 x the MTP layer's
loss (DeepSeek-V3 style, MTP gradients reach the trunk). Deterministic from ``--seed`` (data
order, init); weights in fp32, matmuls in bf16 autocast.

Reports the loss curve, held-out loss and top-1 accuracy of the model and of the MTP layer, and
per MoE layer the expert-load entropy (normalised: 1 = every expert gets the same share).

    python bench/gpu/pretrain_moe.py --out-model /tmp/moe      # GPU: writes bench/results/gpu_pretrain.json
    python bench/gpu/pretrain_moe.py --tiny --device cpu --out-model /tmp/moe-tiny --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write  # noqa: E402
from corpus import MIXTURE, token_stream  # noqa: E402

TOKENIZER = "qwen3"


def build_model(size: str, device: torch.device, seed: int, aux_coef: float):
    """Fresh (model, mtp) of ``size`` (see ``miles_envs.models.factory``) with one MTP layer."""
    from transformers import AutoModelForCausalLM

    from miles_envs.models.factory import _special_ids, build_config
    from miles_envs.models.mtp import build_mtp
    from miles_envs.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    bos, eos = _special_ids(tokenizer)
    config = build_config("qwen3-moe", size, len(tokenizer), mtp=1, bos=bos, eos=eos, context=4096)
    config.router_aux_loss_coef = aux_coef
    torch.manual_seed(seed)
    # the per-expert loop runs under autocast; the saved config keeps the default (grouped) experts
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager").to(device)
    return model, build_mtp(model, 1).float()


def unique_parameters(*modules) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def losses(model, mtp, ids: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    """Next-token CE, MTP CE (position t reads h[t] and token t+1, predicts token t+2), balance loss,
    and the top-1 hits and routing choices for the metrics."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from miles_envs.models.mtp import mtp_hidden

    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model.model(input_ids=inputs, output_router_logits=True)
        hidden = out.last_hidden_state
        logits = model.lm_head(hidden)
        positions = torch.arange(1, inputs.shape[1], device=ids.device)[None]
        mtp_out = mtp_hidden(mtp, 0, inputs[:, 1:], hidden[:, :-1], positions, None)
        mtp_logits = mtp._project_to_logits(mtp_out)
    config = model.config
    aux = load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok, None)
    mtp_targets = targets[:, 1:]
    return {
        "lm": F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()),
        "mtp": F.cross_entropy(mtp_logits.float().flatten(0, 1), mtp_targets.flatten()),
        "aux": aux,
        "lm_hits": (logits.argmax(-1) == targets).float().mean().detach(),
        "mtp_hits": (mtp_logits.argmax(-1) == mtp_targets).float().mean().detach(),
        "routing": torch.stack([r.float().topk(config.num_experts_per_tok, -1).indices for r in out.router_logits]).detach(),
    }


@torch.no_grad()
def evaluate(model, mtp, windows: torch.Tensor, autocast: bool, batch: int) -> dict:
    """Held-out losses/accuracies and expert-load entropy per MoE layer."""
    model.eval(), mtp.eval()
    totals = {"lm": 0.0, "mtp": 0.0, "lm_hits": 0.0, "mtp_hits": 0.0}
    experts = model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, experts, device=windows.device)
    chunks = windows.split(batch)
    for chunk in chunks:
        out = losses(model, mtp, chunk, autocast)
        for key in totals:
            totals[key] += float(out[key]) / len(chunks)
        for layer, indices in enumerate(out["routing"]):
            counts[layer] += torch.bincount(indices.flatten(), minlength=experts).float()
    model.train(), mtp.train()
    share = counts / counts.sum(-1, keepdim=True)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(-1) / math.log(experts)
    return {
        "lm_loss": totals["lm"],
        "lm_top1": totals["lm_hits"],
        "mtp_loss": totals["mtp"],
        "mtp_top1": totals["mtp_hits"],
        "expert_load_entropy": [round(float(v), 4) for v in entropy],
        "expert_max_share": [round(float(v), 4) for v in share.max(-1).values],
    }


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(args) -> tuple[Path, dict]:
    """Train, save the checkpoint folder to ``args.out_model``, and return (folder, report)."""
    from miles_envs.models.factory import save_folder

    device = torch.device(args.device)
    autocast = device.type == "cuda"
    started = time.perf_counter()
    stream = torch.tensor(token_stream(TOKENIZER, args.documents, args.seed, workers=args.workers), dtype=torch.long)
    corpus_s = time.perf_counter() - started
    window = args.seq + 1
    held_windows = args.eval_windows
    held, train = stream[-held_windows * window :], stream[: -held_windows * window]
    held = held.view(held_windows, window).to(device)
    model, mtp = build_model(args.size, device, args.seed, args.aux_coef)
    params = unique_parameters(model, mtp)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    curve, initial = [], evaluate(model, mtp, held, autocast, args.batch)
    train_started = time.perf_counter()
    step = 0
    for step in range(args.steps):
        if time.perf_counter() - train_started > args.time_limit:
            break
        offsets = torch.randint(0, len(train) - window, (args.batch,), generator=generator)
        ids = torch.stack([train[o : o + window] for o in offsets.tolist()]).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out = losses(model, mtp, ids, autocast)
        loss = out["lm"] + args.aux_coef * out["aux"] + args.mtp_weight * out["mtp"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - train_started
            point = {"step": step, "lm_loss": float(out["lm"].detach()), "mtp_loss": float(out["mtp"].detach()), "aux_loss": float(out["aux"].detach()),
                     "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2)}
            curve.append(point)
            print(f"pretrain step {step:5d} lm {point['lm_loss']:.3f} mtp {point['mtp_loss']:.3f} aux {point['aux_loss']:.3f} "
                  f"{elapsed:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - train_started
    steps_done = step + 1 if args.steps else 0
    final = evaluate(model, mtp, held, autocast, args.batch)
    model.set_experts_implementation("grouped_mm" if device.type == "cuda" else "eager")
    meta = {"arch": "qwen3-moe", "size": args.size, "mtp": 1, "tokenizer": TOKENIZER, "seed": args.seed, "steps_planned": args.steps, "steps": steps_done}
    folder = save_folder(args.out_model, model.eval(), mtp.eval(), TOKENIZER, meta)
    config = model.config
    report = {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": {
            "arch": "Qwen3-MoE + 1 MTP layer (DeepSeek-V3 NextN layout)", "size": args.size,
            "hidden": config.hidden_size, "layers": config.num_hidden_layers, "experts": config.num_experts,
            "topk": config.num_experts_per_tok, "moe_ffn": config.moe_intermediate_size, "vocab": config.vocab_size,
            "params": sum(p.numel() for p in params),
            "params_without_embedding": sum(p.numel() for p in params) - model.get_input_embeddings().weight.numel(),
        },
        "corpus": {"documents": args.documents, "tokens": len(stream), "mixture": MIXTURE, "build_s": round(corpus_s, 1)},
        "training": {
            "seed": args.seed, "steps": steps_done, "steps_planned": args.steps, "batch": args.batch, "seq": args.seq,
            "tokens": steps_done * args.batch * args.seq, "lr": args.lr, "warmup": args.warmup, "aux_coef": args.aux_coef,
            "mtp_weight": args.mtp_weight, "precision": "fp32 weights, bf16 autocast" if autocast else "fp32",
            "train_s": round(train_s, 1), "tokens_per_s": round(steps_done * args.batch * args.seq / max(train_s, 1e-9)),
            "hit_time_limit": steps_done < args.steps,
        },
        "held_out": {"tokens": held.numel(), "initial": initial, "final": final},
        "loss_curve": curve,
    }
    return folder, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny shape and few steps (a CPU smoke run)")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--mtp-weight", type=float, default=0.3)
    parser.add_argument("--documents", type=int, default=32000)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds of training at most (a safety stop)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-model", default="/tmp/miles-moe")


def apply_tiny(args) -> None:
    if args.tiny:
        args.size, args.steps, args.batch, args.seq, args.documents = "tiny", 6, 2, 64, 60
        args.eval_windows, args.warmup, args.log_every, args.workers = 2, 2, 2, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", default=str(RESULTS / "gpu_pretrain.json"))
    args = parser.parse_args()
    apply_tiny(args)
    folder, report = pretrain(args)
    final = report["held_out"]["final"]
    print(f"held-out: lm loss {final['lm_loss']:.3f} top1 {final['lm_top1']:.3f}; mtp loss {final['mtp_loss']:.3f} "
          f"top1 {final['mtp_top1']:.3f}; expert-load entropy {final['expert_load_entropy']}")
    print(f"checkpoint {folder}; wrote {write(args.out, report)}")


if __name__ == "__main__":
    main()
