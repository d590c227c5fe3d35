"""TP/EP equivalence of the megatron backend with R3: TP=2 and EP=2 against one rank's layout.

Run under ``torchrun --nproc-per-node 2``. Every rank builds the same small Qwen3-MoE (+1 MTP
layer) and the same rollout batch (routing traces from the HF model, as the engine records them),
then for each layout (TP=1/EP=1, TP=2, EP=2) builds a ``MegatronTrainer`` with R3 and MTP-SFT on
and records

- the experts every decoder router used in a replayed no-grad forward (gathered over the ranks
  that split the tokens), which must equal the trace exactly;
- the per-token logprobs of that forward;
- the metrics of one training step (policy loss, MTP loss, router disagreement). megatron-core
  trains MoE + tensor parallelism only with sequence parallelism, which needs transformer-engine's
  norms: without it the TP=2 layout is compared on the forward alone.

Rank 0 compares each layout with TP=1/EP=1 and writes the JSON. On CPU (``--device cpu``) the
ranks talk over gloo, with the test shim that lets megatron-core place tensors on the CPU and
torch AdamW in place of megatron's CUDA optimizer; on GPUs over NCCL with megatron's DDP and
optimizer (fp32 weights, so differences measure the parallel split, not bf16 rounding).

    torchrun --nproc-per-node 2 bench/gpu/megatron_parallel.py --out bench/results/megatron_parallel.json
    torchrun --nproc-per-node 2 bench/gpu/megatron_parallel.py --device cpu --out /tmp/parallel.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tensor_parallel, expert_parallel)


def trajectories(model, count: int, seed: int):
    """``count`` sequences of varied length whose routing traces come from the HF model."""
    from tests.trainer.tiny import make_trajectory, rollout_routing

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(1, model.config.vocab_size, (int(torch.randint(3, 9, (1,), generator=generator)),), generator=generator)
        response = torch.randint(1, model.config.vocab_size, (int(torch.randint(4, 21, (1,), generator=generator)),), generator=generator)
        tokens = prompt.tolist() + response.tolist()
        out.append(make_trajectory(prompt.tolist(), response.tolist(), reward=float(i % 3), group_id=f"g{i // 4}",
                                   routed=rollout_routing(model, tokens)))
    return out


@contextlib.contextmanager
def layout(device: str, tp: int, ep: int, seed: int):
    """megatron's parallel state for one layout over the already-joined world."""
    from megatron.core import parallel_state, tensor_parallel

    if device == "cpu":
        from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer

        with cpu_megatron(seed, tp, ep), cpu_optimizer():
            yield
        return
    parallel_state.initialize_model_parallel(tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def replayed_forward(config, weights, settings, batch, device: str):
    """Experts each decoder router used ([tokens, topk] per router, megatron's token order, all
    tokens) and the logprobs of one replayed forward of a freshly built model in eval mode."""
    from megatron.core import parallel_state

    from miles_envs.trainer.losses import token_logprobs_and_entropy
    from miles_envs.trainer.megatron.attention import install_packed_attention
    from miles_envs.trainer.megatron.forward import pad_width, run_forward
    from miles_envs.trainer.megatron.model import build_gpt_model
    from miles_envs.trainer.megatron.replay import MegatronRoutingReplay
    from miles_envs.trainer.megatron.weights import load_hf_weights

    gpt = build_gpt_model(config, settings).to(device).eval()
    load_hf_weights(gpt, config, weights)
    install_packed_attention(gpt)
    replay = MegatronRoutingReplay(gpt)
    seen: dict[int, torch.Tensor] = {}
    hooks = [router.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out[1].detach()))
             for k, (_, router) in enumerate(replay.routers)]
    width = batch.input_ids.shape[1]
    if gpt.config.sequence_parallel:
        batch = pad_width(batch, settings.tensor_parallel)
    try:
        with torch.no_grad(), replay.apply(batch.routed_experts, replay=True):
            out = run_forward(gpt, gpt, batch, device)
    finally:
        for hook in hooks:
            hook.remove()
    logprobs, _ = token_logprobs_and_entropy(out.logits[:, :width], batch.targets[:, :width].to(device))
    experts = []
    for k in range(len(hooks)):
        chosen = seen[k].nonzero()[:, 1].view(seen[k].shape[0], -1)  # routing map [tokens, E] -> indices
        if gpt.config.sequence_parallel:  # each tensor-parallel rank routed its chunk of the tokens
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(chosen) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, chosen.contiguous(), group=group)
            chosen = torch.cat(parts)
        experts.append(chosen.cpu())
    trace = batch.routed_experts.transpose(0, 1).reshape(-1, *batch.routed_experts.shape[2:])  # megatron order
    valid = (trace >= 0).all(-1).all(-1)
    exact = all(torch.equal(e[valid].sort(-1).values, trace[valid][:, k].long().sort(-1).values) for k, e in enumerate(experts))
    return experts, logprobs.float().cpu()[batch.loss_mask[:, :width].bool()], exact


def run_layout(args, tp: int, ep: int, config, weights, data) -> dict:
    """The replayed forward, and one training step where megatron can train the layout."""
    from miles_envs.trainer.batch import pack
    from miles_envs.trainer.config import TrainerConfig
    from miles_envs.trainer.megatron.backend import MegatronTrainer
    from miles_envs.trainer.megatron.model import MegatronSettings, have_transformer_engine

    cpu = args.device == "cpu"
    settings = MegatronSettings(
        tensor_parallel=tp, expert_parallel=ep, routing_replay=True,
        token_dispatcher="allgather" if cpu else "alltoall", use_cpu_initialization=cpu,
    )
    (batch, *_) = pack(data, [0.0] * len(data), [1.0] * len(data), max_row_tokens=args.row_tokens, rows_per_micro_batch=8)
    with layout(args.device, tp, ep, args.seed):
        experts, logprobs, exact = replayed_forward(config, weights, settings, batch, args.device)
        metrics = None
        if tp == 1 or have_transformer_engine():  # MoE + TP trains only with sequence parallelism (TE norms)
            trainer = MegatronTrainer(
                config, weights, TrainerConfig(device=args.device, r3=True, mtp_sft=True, lr=1e-3, tis_cap=None,
                                               max_row_tokens=args.row_tokens), settings
            )
            metrics = trainer.train_step(data)
    return {"experts": experts, "logprobs": logprobs, "replay_equals_trace": exact, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sequences", type=int, default=12)
    parser.add_argument("--row-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "megatron_parallel.json"))
    args = parser.parse_args()

    from tests.trainer.megatron.models import tiny_qwen3_moe

    from miles_envs.trainer.megatron.backend import hf_state_of

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    config, model, mtp = tiny_qwen3_moe(mtp=1, seed=args.seed)
    data = trajectories(model, args.sequences, args.seed)
    weights = hf_state_of(model, mtp)
    results = {(tp, ep): run_layout(args, tp, ep, config, weights, data) for tp, ep in LAYOUTS}
    if dist.get_rank() == 0:
        base = results[(1, 1)]
        report = {"device": args.device, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                  "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                  "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
                  "model": "tiny qwen3-moe (2 layers, 8 experts top-2, 1 MTP layer), fp32", "layouts": {}}
        if args.device == "cpu":
            report["grad_norm_note"] = "CPU: torch AdamW per rank clips on the rank's own parameters, so under EP the norm covers its local experts only"
        for (tp, ep), res in results.items():
            keys = ("pg_loss", "mtp/loss", "mismatch/router_disagreement", "grad_norm")
            entry = {
                "replayed_experts_equal_trace": res["replay_equals_trace"],
                "replayed_experts_equal_tp1_ep1": all(torch.equal(a, b) for a, b in zip(res["experts"], base["experts"])),
                "logprob_max_abs_diff_vs_tp1_ep1": float((res["logprobs"] - base["logprobs"]).abs().max()),
                "train_step": res["metrics"] is not None,
            }
            if res["metrics"] is None:
                entry["train_step_note"] = "MoE + tensor parallelism trains only with sequence parallelism, which megatron-core's local (non transformer-engine) norms refuse"
            else:
                entry |= {k: res["metrics"].get(k) for k in keys}
                entry |= {f"{k}_abs_diff_vs_tp1_ep1": abs(res["metrics"][k] - base["metrics"][k]) for k in keys[:2]}
            report["layouts"][f"tp{tp}_ep{ep}"] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
