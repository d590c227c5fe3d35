"""The megatron backend on a GPU: step time, tokens/s and MFU before/after the profile-driven fixes,
R3 overhead with a confidence interval, rollout/trainer mismatch, MTP-SFT on fresh rollouts.

Model: a random-init stand-in of the trained small MoE's shape (``pretrain_moe.py``'s ``medium``:
Qwen3-MoE, 8 layers, hidden 512, 32 experts top-4, expert FFN 256, the Qwen3 vocabulary, tied
head, one MTP layer), sharpened like ``bench/r3_mismatch.py`` so routing flips move logprobs. The
embedded engine (bf16, routing traces on) rolls out every batch in one pass; each training step
then takes a batch no step has seen (fresh rollouts, sampled by the initial policy, so a step never
trains on data it already fitted). The trainer is the megatron backend in bf16 (Float16Module,
megatron DDP + optimizer), R3 and MTP-SFT on. Phases, each written to the JSON as it ends:

1. ``mismatch``: one no-grad forward of the first batch with and without replay (k3-KL etc.).
2. ``mfu``: fresh batches through three trainers (``ARMS``), all with per-sequence attention, in
   rounds whose order alternates: megatron's ``SequentialMLP`` experts (one MLP call per expert)
   and megatron's output layer (full logits); ``GroupedMLP`` experts (two grouped GEMMs per layer)
   with the same head; grouped experts and the chunked vocabulary head (``vocab_head.py``). Each
   arm's median, spread and MFU, and the per-token step-time ratio of each fix with a 95%
   t-interval over the rounds. (The attention fix before them was measured the same way, masked
   attention over packed rows against per-sequence SDPA: ``bench/gpu/NOTES.md``.)
3. ``profile``: one step of each arm under torch.profiler (GPU busy share, host syncs, top ops).
4. ``r3_overhead``: ``--pairs`` pairs of steps with and without routing traces, in alternating
   order (on-off, off-on, ...), each on a fresh batch; the geometric-mean ratio with a 95%
   t-interval over the pairs.
5. ``mtp``: the MTP loss of every step of the final trainer (grouped experts, chunked head), in order.

``--time-limit`` bounds the whole run: the timed loops stop early (the JSON says how many steps
and pairs ran; the MFU pairs leave time for the profile and all R3 pairs) so that the results file
is complete before an outer timeout would kill the process.

MFU = FLOPs per step / step time / the card's dense bf16 peak (``H200_SXM_BF16_DENSE_PEAK``, the
datasheet figure; the bf16 matmul peak measured on the card is reported beside it). FLOPs per step = 6 x active
parameters x tokens (experts weighted top-k/E; the embedding lookup not counted) + 6 x vocab x hidden x
response tokens per use of the tied vocabulary head (main head and MTP head: the losses need no
logits at prompt tokens, so computing them there is not counted) + causal attention 12 x heads x
head_dim x sum over sequences of L(L+1)/2 per layer (decoder and MTP layers).

    python bench/gpu/megatron_r3_mtp.py --time-limit 150 --samples 128 --max-running 8192 --mfu-steps 6 \
        --out bench/results/megatron_r3_mtp.json
    python bench/gpu/megatron_r3_mtp.py --tiny --device cpu --out /tmp/megatron_r3_mtp.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, ratio_ci  # noqa: E402
from r3_mismatch import PROMPTS, measure, rollout, sharpened_model  # noqa: E402

from miles_envs.trainer import TrainerConfig  # noqa: E402

H200_SXM_BF16_DENSE_PEAK = 989.4e12  # FLOP/s, NVIDIA H200 SXM datasheet, dense (no sparsity)
H100_SXM_BF16_DENSE_PEAK = 989.4e12  # FLOP/s, NVIDIA H100 SXM datasheet, dense
PEAKS = {"H200": H200_SXM_BF16_DENSE_PEAK, "H100": H100_SXM_BF16_DENSE_PEAK}
ARMS = {  # the MFU phase's arms, in the order the fixes came: (experts, vocab_head, what it is)
    "sequential": ("sequential", "unfused", "before: megatron's SequentialMLP, one MLP call per expert (host-side split by "
                   "token counts); megatron's output layer, full fp32 logits for the losses"),
    "grouped": ("grouped", "unfused", "GroupedMLP, all experts in two grouped_mm calls per layer (same weights); "
                "megatron's output layer"),
    "fused": ("grouped", "fused", "after: GroupedMLP and the chunked vocabulary head (logprobs, entropy, MTP cross-entropy "
              "per chunk of tokens, never all logits)"),
}
FINAL = "fused"  # the trainer the mismatch, R3 and MTP phases use
SHAPES = {  # pretrain_moe.py's medium, and a CPU-sized one for trying the script
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                   num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128),
}


class Report(dict):
    """The results file, rewritten after every phase so a run cut short still leaves its figures."""

    def __init__(self, path: Path, **fields) -> None:
        super().__init__(**fields)
        self.path = path

    def phase(self, name: str, value) -> None:
        self[name] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=2))
        print(f"[{name}] {json.dumps(value)[:600]}", flush=True)


def write_checkpoint(folder: Path, args):
    """The random-init stand-in (main model in ``folder`` for the engine) and its HF weights + MTP."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from miles_envs.models.factory import init_model
    from miles_envs.models.mtp import build_mtp
    from miles_envs.trainer.megatron.backend import hf_state_of

    init_model(folder, arch="qwen3-moe", size="tiny", seed=args.seed)
    config = AutoConfig.from_pretrained(folder)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    config.tie_word_embeddings = True
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder)
    sharpened_model(folder, args.expert_scale, args.head_scale)
    stop_on_last_token(folder, config.vocab_size - 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    mtp = build_mtp(model, 1)  # sets num_nextn_predict_layers on the config the trainer builds from
    return model.config, hf_state_of(model, mtp)


def stop_on_last_token(folder: Path, stop_id: int) -> None:
    """A random model emits its end-of-turn token within a few steps; stop on the last vocabulary id
    instead (1 in ~150k draws), so responses run to ``--max-new-tokens`` and steps have real length."""
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token_id"] = [stop_id]
        (folder / name).write_text(json.dumps(data, indent=2))


def fresh_batches(folder: Path, args, count: int) -> tuple[list[list], float]:
    """``count`` batches of ``--samples`` trajectories from one rollout pass; reward = share of even
    token ids (spread inside every group)."""
    from miles_envs.agents.embedded import EmbeddedEngine

    engine = EmbeddedEngine.from_path(folder, device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
                                      max_running=args.max_running)
    chat = [engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
            for i in range(len(PROMPTS))]
    chat = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in chat]
    prompts = [chat[i % len(chat)] for i in range(count * args.samples)]

    async def run():
        try:
            return await rollout(engine, prompts, args.max_new_tokens, args.seed)
        finally:
            await engine.close()

    start = time.perf_counter()
    trajectories = asyncio.run(run())
    seconds = time.perf_counter() - start
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    trajectories = [dataclasses.replace(t, reward=sum(1 for x in t.response_ids if x % 2 == 0) / max(1, len(t.response_ids)))
                    for t in trajectories]
    return [trajectories[i * args.samples:(i + 1) * args.samples] for i in range(count)], seconds


def without_traces(batch: list) -> list:
    return [dataclasses.replace(t, routed_experts=None) for t in batch]


def step_flops(trainer, batch: list) -> float:
    """FLOPs of one training step (forward + backward) on ``batch`` (formula in the module docstring)."""
    cfg = trainer.gpt.config
    dense = expert = 0
    for name, p in trainer.gpt.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            continue  # the head's matmuls are counted below, once per use
        if ".experts." in name:
            expert += p.numel()
        else:
            dense += p.numel()
    depth = cfg.mtp_num_layers or 0
    active = dense + expert * cfg.moe_router_topk / cfg.num_moe_experts
    head = trainer.hf_config.vocab_size * cfg.hidden_size * (1 + depth) * sum(t.num_model_tokens for t in batch)
    lengths = [len(t.tokens) - 1 for t in batch]
    causal_pairs = sum(n * (n + 1) / 2 for n in lengths)
    attention = 12 * cfg.num_attention_heads * cfg.kv_channels * causal_pairs * (cfg.num_layers + depth)
    return 6.0 * (active * sum(lengths) + head) + attention


def measured_matmul_peak(device: str) -> float | None:
    """bf16 8192^3 matmul throughput on this card (FLOP/s), median of 10."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 8192**3 / statistics.median(times[3:])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer, batch: list, device: str) -> tuple[float, dict]:
    sync(device)
    start = time.perf_counter()
    metrics = trainer.train_step(batch)
    sync(device)
    return time.perf_counter() - start, metrics


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiled_step(trainer, batch: list, device: str) -> dict:
    """One step under torch.profiler: GPU busy share, host syncs, the ops that take the GPU's and the
    host's time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.train_step(batch)
        sync(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    busy_us = sum(device_us(e) for e in averages)
    def row(event) -> dict:
        return {"op": event.key, "calls": event.count, "self_device_ms": device_us(event) / 1e3, "self_cpu_ms": event.self_cpu_time_total / 1e3}

    top = sorted(averages, key=device_us if device == "cuda" else (lambda e: e.self_cpu_time_total), reverse=True)[:12]
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "wall_seconds": wall,
        "gpu_busy_share": busy_us / 1e6 / wall if device == "cuda" else None,
        "host_syncs": {e.key: e.count for e in averages if e.key in SYNC_EVENTS},
        "kernel_launches": sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC")),
        "top_ops": [row(e) for e in top],
        "top_host_ops": [row(e) for e in host],
    }


class Clock:
    """The run's time limit: the timed loops ask it whether another step still fits."""

    def __init__(self, limit_s: float) -> None:
        self.end = time.perf_counter() + limit_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def make_trainer(hf_config, hf_weights, args, arm: str):
    from miles_envs.trainer.megatron.backend import MegatronTrainer
    from miles_envs.trainer.megatron.model import MegatronSettings

    cuda = args.device == "cuda"
    experts, head, _ = ARMS[arm]
    settings = MegatronSettings(bf16=cuda, routing_replay=True, mtp_loss_scale=0.2, experts=experts, vocab_head=head,
                                token_dispatcher="alltoall" if cuda else "allgather", use_cpu_initialization=not cuda)
    config = TrainerConfig(r3=True, mtp_sft=True, dtype="bfloat16" if cuda else "float32", device=args.device, lr=args.lr,
                           max_row_tokens=args.row_tokens, rows_per_micro_batch=args.rows_per_micro_batch)
    return MegatronTrainer(hf_config, hf_weights, config, settings)


@contextlib.contextmanager
def megatron_here(device: str):
    """GPU: nothing (the trainer sets up its parallel state). CPU: the test shim's gloo group."""
    if device == "cuda":
        yield
        return
    from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer

    with cpu_megatron(), cpu_optimizer():
        yield


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and batches, to try the script")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--samples", type=int, default=64, help="trajectories per step")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--mfu-steps", type=int, default=4, help="timed steps per MFU arm (interleaved rounds)")
    parser.add_argument("--pairs", type=int, default=16, help="R3 on/off pairs")
    parser.add_argument("--row-tokens", type=int, default=8192)
    parser.add_argument("--rows-per-micro-batch", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=4096, help="engine rows decoded together (all rollouts in one wave)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--expert-scale", type=float, default=10.0)
    parser.add_argument("--head-scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds for the whole run; loops stop early to fit")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "megatron_r3_mtp.json"))
    args = parser.parse_args()
    args.shape = "tiny" if args.tiny else "medium"
    if args.tiny:
        args.samples, args.max_new_tokens, args.row_tokens = min(args.samples, 8), min(args.max_new_tokens, 12), min(args.row_tokens, 512)
    return args


def tokens(batch: list) -> int:
    return sum(len(t.tokens) - 1 for t in batch)


def mfu_phase(report: Report, trainers: dict, fresh, args, clock: Clock, reserve_s) -> list:
    """Timed steps of the ``ARMS`` trainers in rounds whose order alternates; returns the final
    trainer's MTP losses. A round runs while the time left exceeds ``reserve_s(steps)``."""
    steps, mtp_loss = {name: [] for name in ARMS}, []
    for name in ARMS:
        timed_step(trainers[name], next(fresh), args.device)  # warm-up
    for round_ in range(args.mfu_steps):
        if round_ and clock.left() < reserve_s(steps):
            break
        for name in (list(ARMS) if round_ % 2 == 0 else list(ARMS)[::-1]):
            batch = next(fresh)
            seconds, metrics = timed_step(trainers[name], batch, args.device)
            steps[name].append({"seconds": seconds, "tokens": tokens(batch), "flops": step_flops(trainers[name], batch)})
            if name == FINAL:
                mtp_loss.append(metrics.get("mtp/loss"))
    peak, measured = report["peak_bf16_dense_flops"], report["measured_matmul_peak_flops"]
    summary = {}
    for name, timed in steps.items():
        seconds = [s["seconds"] for s in timed]
        flops_per_s = sum(s["flops"] for s in timed) / sum(seconds)
        summary[name] = {"arm": ARMS[name][2], "step_seconds_median": statistics.median(seconds),
                         "step_seconds_min": min(seconds), "step_seconds_max": max(seconds),
                         "tokens_per_second": sum(s["tokens"] for s in timed) / sum(seconds), "tflops_per_second": flops_per_s / 1e12,
                         "mfu_vs_datasheet": flops_per_s / peak if peak else None,
                         "mfu_vs_measured_matmul": flops_per_s / measured if measured else None, "steps": timed}
    per_token = {name: [s["seconds"] / s["tokens"] for s in timed] for name, timed in steps.items()}
    summary["speedup"] = {"sequential_over_grouped": ratio_ci(per_token["sequential"], per_token["grouped"]),
                          "grouped_over_fused": ratio_ci(per_token["grouped"], per_token["fused"]),
                          "of": "seconds per token, per round (each step on a fresh batch)",
                          "ci": "geometric mean of the per-pair ratios, 95% t-interval on their logs"}
    report.phase("mfu", summary)
    return mtp_loss


def r3_phase(report: Report, trainer, fresh, args, clock: Clock, mtp_loss: list) -> None:
    """``--pairs`` interleaved on/off pairs (fewer when the time limit comes first)."""
    on, off = [], []
    for pair in range(-1, args.pairs):  # pair -1 warms both paths up
        if pair > 0 and clock.left() < 2.5 * (on[-1] + off[-1]):
            break
        order = (True, False) if pair % 2 == 0 else (False, True)
        times = {}
        for replay in order:
            batch = next(fresh)
            times[replay], metrics = timed_step(trainer, batch if replay else without_traces(batch), args.device)
            if pair >= 0:
                mtp_loss.append(metrics.get("mtp/loss"))
        if pair >= 0:
            on.append(times[True])
            off.append(times[False])
    report.phase("r3_overhead", {"ratio_on_over_off": ratio_ci(on, off), "seconds_on": on, "seconds_off": off,
                                 "pairs_planned": args.pairs,
                                 "order": "alternating on-off / off-on, a fresh batch every step",
                                 "ci": "geometric mean of the per-pair ratios, 95% t-interval on their logs"})


def main() -> None:
    args = parse_args()
    clock = Clock(args.time_limit)
    import megatron.core  # noqa: F401  (fail before any work when megatron-core is missing)

    cuda = args.device == "cuda"
    info = machine()
    peak_name, peak = next(((name, value) for name, value in PEAKS.items() if name in info["card"]), (None, None))
    report = Report(Path(args.out), machine=info, shape=args.shape, model={"arch": "qwen3-moe + 1 MTP layer", **SHAPES[args.shape],
                    "vocab": None, "init": "random, sharpened: a stand-in with the trained small MoE's shape (pretrain_moe.py medium)"},
                    peak_bf16_dense_flops=peak, peak_source=f"{peak_name}_SXM_BF16_DENSE_PEAK, the datasheet figure" if peak else None,
                    mfu_formula=__doc__.split("MFU = ")[1].split("\n\n")[0].replace("\n", " "), time_limit_s=args.time_limit)
    report.phase("measured_matmul_peak_flops", measured_matmul_peak(args.device))
    batches_needed = 1 + len(ARMS) * (2 + args.mfu_steps) + 2 * (1 + args.pairs)  # mismatch, mfu, r3 pairs, profile
    with tempfile.TemporaryDirectory() as tmp, megatron_here(args.device):
        folder = Path(tmp) / "model"
        hf_config, hf_weights = write_checkpoint(folder, args)
        report["model"]["vocab"] = hf_config.vocab_size
        batches, rollout_s = fresh_batches(folder, args, batches_needed)
        report.phase("rollout", {"batches": len(batches), "samples_per_batch": args.samples, "max_new_tokens": args.max_new_tokens,
                                 "seconds": rollout_s, "engine": f"embedded, {'bf16' if cuda else 'fp32'}, one pass for all steps",
                                 "tokens_per_step_mean": statistics.mean(tokens(b) for b in batches)})
        fresh = iter(batches)

        trainers = {FINAL: make_trainer(hf_config, hf_weights, args, FINAL)}
        first = next(fresh)
        report.phase("mismatch", {"without_r3": measure(trainers[FINAL], first, replay=False),
                                  "with_r3": measure(trainers[FINAL], first, replay=True)})
        trainers |= {name: make_trainer(hf_config, hf_weights, args, name) for name in ARMS if name != FINAL}
        del hf_weights

        def reserve_s(steps: dict) -> float:  # time the R3 pairs and the profiled steps will need, plus a margin
            slowest = {name: max(s["seconds"] for s in steps[name]) for name in ARMS}
            return 2 * (args.pairs + 1) * slowest[FINAL] + 3 * sum(slowest.values()) + 5

        mtp_loss = mfu_phase(report, trainers, fresh, args, clock, reserve_s)
        r3_phase(report, trainers[FINAL], fresh, args, clock, mtp_loss)
        if clock.left() > 3 * sum(report["mfu"][name]["step_seconds_median"] for name in ARMS):
            report.phase("profile", {name: profiled_step(trainers[name], next(fresh), args.device) for name in ARMS})
        report.phase("mtp", {"loss_per_step": mtp_loss, "note": "final trainer (grouped experts, chunked head), every step on a batch it had not seen"})
        final, mismatch, overhead = report["mfu"][FINAL], report["mismatch"], report["r3_overhead"]
        report.phase("summary", {  # the headline figures under the keys the README's results table reads
            "card": info["card"], "tokens_per_step": round(report["rollout"]["tokens_per_step_mean"]),
            "step_seconds_r3_on_median": statistics.median(overhead["seconds_on"]), "tokens_per_second_r3_on": final["tokens_per_second"],
            "mfu_r3_on": final["mfu_vs_datasheet"], "mfu_note": report["mfu_formula"],
            "r3_overhead_ratio": overhead["ratio_on_over_off"]["ratio"],
            "k3_kl_reduction": mismatch["without_r3"]["k3_kl"] / max(mismatch["with_r3"]["k3_kl"], 1e-30),
        })
        report.update(report.pop("summary"))
        report.path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
