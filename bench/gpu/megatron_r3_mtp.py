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
2. ``mfu``: fresh batches through one trainer per ``--arms`` entry (``ARMS``: the fixes in the order
   they came), all with per-sequence attention, in rounds whose order alternates. Each arm's median,
   spread and MFU, and the per-token step-time ratio of each arm over the next with a 95% t-interval
   over the rounds. (The attention fix before them was measured the same way, masked attention over
   packed rows against per-sequence SDPA: ``bench/gpu/NOTES.md``.)
3. ``micro_batch_sweep``: the final arm at ``--mfu-micro-tokens`` tokens per micro-batch (each step
   joins as many fresh batches as that takes, packed into one micro-batch), MFU and peak memory
   per size: how MFU grows when every kernel gets more work.
4. ``profile``: one step of each arm under torch.profiler (GPU busy share, host syncs, kernel
   launches, top ops), and one more counting the host's reads of device values
   (``trainer/megatron/host_reads.py``).
5. ``r3_overhead``: ``--pairs`` pairs of steps with and without routing traces, in alternating
   order (on-off, off-on, ...), each on a fresh batch; the geometric-mean ratio with a 95%
   t-interval over the pairs.
6. ``mtp``: the MTP loss of every step of the final trainer, in order.

An arm that fails (out of memory, say) is recorded with its error under ``failed`` and the run goes
on without it. ``--time-limit`` bounds the whole run: the timed loops stop early (the JSON says how
many steps and pairs ran; the MFU rounds leave time for the sweep, the profile and the R3 pairs) so
that the results file is complete before an outer timeout would kill the process.

MFU = FLOPs per step / step time / the card's dense bf16 peak (``H200_SXM_BF16_DENSE_PEAK``, the
datasheet figure; the bf16 matmul peak measured on the card is reported beside it). FLOPs per step = 6 x active
parameters x tokens (experts weighted top-k/E; the embedding lookup not counted) + 6 x vocab x hidden x
response tokens per use of the tied vocabulary head (main head and MTP head: the losses need no
logits at prompt tokens, so computing them there is not counted) + causal attention 12 x heads x
head_dim x sum over sequences of L(L+1)/2 per layer (decoder and MTP layers).

    python bench/gpu/megatron_r3_mtp.py --time-limit 150 --samples 128 --max-running 8192 --mfu-steps 6 \
        --mfu-micro-tokens 18k 37k 74k --out bench/results/megatron_r3_mtp.json
    python bench/gpu/megatron_r3_mtp.py --tiny --device cpu --out /tmp/megatron_r3_mtp.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
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
ARMS = {  # the MFU phase's arms, in the order the fixes came:
    # (experts, vocab head, token dispatcher, multi-tensor ops, the head's vocabulary padding), what it is
    "sequential": (("sequential", "unfused", "alltoall", "megatron", 1),
                   "megatron's SequentialMLP, one MLP call per expert (host-side split by token counts); megatron's output "
                   "layer, full fp32 logits for the losses; megatron's alltoall dispatcher and multi-tensor fallbacks"),
    "grouped": (("grouped", "unfused", "alltoall", "megatron", 1),
                "GroupedMLP, all experts in two grouped_mm calls per layer (same weights); megatron's output layer"),
    "fused": (("grouped", "fused", "alltoall", "megatron", 1),
              "GroupedMLP and the chunked vocabulary head (logprobs, entropy, MTP cross-entropy per chunk of tokens, "
              "never all logits) at the unpadded vocabulary; megatron's alltoall dispatcher (host-side token counts in "
              "every MoE layer) and its multi-tensor fallbacks (one host read per parameter for the gradient norm)"),
    "lean": (("grouped", "fused", "device", "device", 64),
             "the fused arm with the head's vocabulary padded to a multiple of 64 (aligned GEMMs), the device token "
             "dispatcher (sort-based permutation, no host read per MoE layer) and device-side multi-tensor ops "
             "(gradient norm, clipping and the fp32 -> bf16 weight copy as foreach ops)"),
}
DEFAULT_ARMS = ("fused", "lean")
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


@contextlib.contextmanager
def multi_tensor_ops(kind: str):
    """Within: the optimizer's multi-tensor ops of an arm. The trainer installs the device-side ones
    (``trainer/megatron/multi_tensor.py``); ``"megatron"`` puts megatron's own local fallbacks (what
    megatron runs without transformer-engine and apex) back for the arms before that fix."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    names = [n for n in ("l2_norm_impl", "multi_tensor_scale_impl", "multi_tensor_scale_tensor_impl") if hasattr(clip_grads, n)]
    saved, saved_copy = {n: getattr(clip_grads, n) for n in names}, optimizer.multi_tensor_scale_impl
    if kind == "megatron":
        fallbacks = {"l2_norm_impl": utils.local_multi_tensor_l2_norm, "multi_tensor_scale_impl": utils.local_multi_tensor_scale,
                     "multi_tensor_scale_tensor_impl": None}
        for name in names:
            setattr(clip_grads, name, fallbacks[name])
        optimizer.multi_tensor_scale_impl = utils.local_multi_tensor_scale
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(clip_grads, name, value)
        optimizer.multi_tensor_scale_impl = saved_copy


def timed_step(trainer, batch: list, device: str, arm: str) -> tuple[float, dict]:
    with multi_tensor_ops(ARMS[arm][0][3]):
        sync(device)
        start = time.perf_counter()
        metrics = trainer.train_step(batch)
        sync(device)
        return time.perf_counter() - start, metrics


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiled_step(trainer, batch: list, device: str, arm: str) -> dict:
    """One step under torch.profiler: GPU busy share, host syncs, the ops that take the GPU's and the
    host's time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with multi_tensor_ops(ARMS[arm][0][3]):
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
        "host_syncs_note": "aten::_local_scalar_dense counts scalar reads of host tensors too (torch AdamW's per-parameter "
                           "step counters live on the host); the waits for the GPU are the cuda*Synchronize counts",
        "kernel_launches": sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")),
        "top_ops": [row(e) for e in top],
        "top_host_ops": [row(e) for e in host],
    }


def host_read_step(trainer, batch: list, device: str, arm: str) -> dict:
    """One step counting the host's reads of device values (``host_reads.count_host_reads``)."""
    from miles_envs.trainer.megatron.host_reads import count_host_reads

    with multi_tensor_ops(ARMS[arm][0][3]), count_host_reads(include_host_tensors=device == "cpu") as counter:
        trainer.train_step(batch)
    return {"total": counter.total, "by_op": dict(counter.counts),
            "counted": "reads of host tensors too (CPU run: what would sync on a GPU)" if device == "cpu" else "reads of device tensors"}


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
    experts, head, dispatcher, _, align = ARMS[arm][0]
    settings = MegatronSettings(bf16=cuda, routing_replay=True, mtp_loss_scale=0.2, experts=experts, vocab_head=head,
                                token_dispatcher=dispatcher, head_vocab_align=align, use_cpu_initialization=not cuda)
    config = TrainerConfig(r3=True, mtp_sft=True, dtype="bfloat16" if cuda else "float32", device=args.device, lr=args.lr,
                           max_row_tokens=args.row_tokens, rows_per_micro_batch=args.rows_per_micro_batch)
    trainer = MegatronTrainer(hf_config, hf_weights, config, settings)
    if arm in args.fail_arm:
        def out_of_memory(_batch):
            raise torch.OutOfMemoryError(f"injected by --fail-arm {arm}")

        trainer.train_step = out_of_memory
    return trainer


@contextlib.contextmanager
def megatron_here(device: str):
    """GPU: nothing (the trainer sets up its parallel state). CPU: the test shim's gloo group, with
    megatron's alltoall dispatcher made to run on host tensors."""
    if device == "cuda":
        yield
        return
    from tests.trainer.megatron.shim import cpu_alltoall, cpu_megatron, cpu_optimizer

    with cpu_megatron(), cpu_optimizer(), cpu_alltoall():
        yield


def count(text: str) -> int:
    """A whole number of at least 1 for a size or a count; ``18k`` -> 18000."""
    try:
        value = float(text[:-1]) * 1000 if text.lower().endswith("k") else float(text)
    except ValueError:
        value = 0.0
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1, e.g. 4, 18k or 37000")
    return int(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and batches, to try the script")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--samples", type=count, default=64, help="trajectories per step")
    parser.add_argument("--max-new-tokens", type=count, default=128)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS),
                        help="MFU arms, before to after; the last one is the trainer of the sweep, mismatch, R3 and MTP phases")
    parser.add_argument("--mfu-steps", type=count, default=4, help="timed steps per MFU arm (interleaved rounds)")
    parser.add_argument("--mfu-micro-tokens", nargs="*", type=count, default=[],
                        help="micro-batch sizes of the sweep (e.g. 18k 37k 74k); none: no sweep")
    parser.add_argument("--sweep-steps", type=count, default=2, help="timed steps per sweep size (after one warm-up)")
    parser.add_argument("--fail-arm", nargs="*", choices=list(ARMS), default=[],
                        help="make these arms' steps raise an out-of-memory error: checks the failure path without a card")
    parser.add_argument("--pairs", type=count, default=16, help="R3 on/off pairs")
    parser.add_argument("--row-tokens", type=count, default=8192)
    parser.add_argument("--rows-per-micro-batch", type=count, default=2)
    parser.add_argument("--max-running", type=count, default=4096, help="engine rows decoded together (all rollouts in one wave)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--expert-scale", type=float, default=10.0)
    parser.add_argument("--head-scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds for the whole run; loops stop early to fit")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "megatron_r3_mtp.json"))
    args = parser.parse_args()
    if len(set(args.arms)) != len(args.arms):
        parser.error(f"--arms {' '.join(args.arms)}: name each arm once")
    args.shape = "tiny" if args.tiny else "medium"
    if args.tiny:
        args.samples, args.max_new_tokens, args.row_tokens = min(args.samples, 8), min(args.max_new_tokens, 12), min(args.row_tokens, 512)
    return args


def tokens(batch: list) -> int:
    return sum(len(t.tokens) - 1 for t in batch)


def attempt(report: Report, arm: str, phase: str, run):
    """``run()``, or ``None`` with the error recorded under ``failed`` when it raises: one arm running
    out of memory must not cost the other arms' figures."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - any failure of an arm is a result to record
        report.setdefault("failed", {})[arm] = {"phase": phase, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(f"[failed] {arm} in {phase}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return None


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def drop(trainers: dict, name: str, device: str) -> None:
    trainers.pop(name, None)
    free_memory(device)


def arm_summary(name: str, timed: list, report: Report) -> dict:
    peak, measured = report["peak_bf16_dense_flops"], report["measured_matmul_peak_flops"]
    seconds = [s["seconds"] for s in timed]
    flops_per_s = sum(s["flops"] for s in timed) / sum(seconds)
    return {"arm": ARMS[name][1] if name in ARMS else name, "step_seconds_median": statistics.median(seconds),
            "step_seconds_min": min(seconds), "step_seconds_max": max(seconds),
            "tokens_per_second": sum(s["tokens"] for s in timed) / sum(seconds), "tflops_per_second": flops_per_s / 1e12,
            "mfu_vs_datasheet": flops_per_s / peak if peak else None,
            "mfu_vs_measured_matmul": flops_per_s / measured if measured else None, "steps": timed}


def mfu_phase(report: Report, trainers: dict, fresh, args, clock: Clock, reserve_s, final: str) -> tuple[dict, list]:
    """Timed steps of the arms' trainers in rounds whose order alternates; returns each arm's steps and
    the final arm's MTP losses. A round runs while the time left exceeds ``reserve_s(steps)``."""
    steps, mtp_loss = {name: [] for name in trainers}, []
    for name in list(trainers):  # warm-up
        batch = next(fresh)
        if attempt(report, name, "warm-up", lambda: timed_step(trainers[name], batch, args.device, name)) is None:
            drop(trainers, name, args.device)
    for round_ in range(args.mfu_steps):
        if round_ and clock.left() < reserve_s(steps):
            break
        for name in (list(trainers) if round_ % 2 == 0 else list(trainers)[::-1]):
            batch = next(fresh)
            done = attempt(report, name, f"mfu round {round_}", lambda: timed_step(trainers[name], batch, args.device, name))
            if done is None:
                drop(trainers, name, args.device)
                continue
            seconds, metrics = done
            steps[name].append({"seconds": seconds, "tokens": tokens(batch), "flops": step_flops(trainers[name], batch)})
            if name == final:
                mtp_loss.append(metrics.get("mtp/loss"))
    summary = {name: arm_summary(name, timed, report) for name, timed in steps.items() if timed}
    ran = [name for name in args.arms if name in summary]
    summary["speedup"] = {f"{a}_over_{b}": ratio_ci([s["seconds"] / s["tokens"] for s in steps[a]], [s["seconds"] / s["tokens"] for s in steps[b]])
                          for a, b in zip(ran, ran[1:])}
    summary["speedup"] |= {"of": "seconds per token, per round (each step on a fresh batch)",
                           "ci": "geometric mean of the per-pair ratios, 95% t-interval on their logs"}
    report.phase("mfu", summary)
    return steps, mtp_loss


def sweep_plan(args) -> list[tuple[int, int]]:
    """``(target tokens per micro-batch, rollout batches joined per step)`` for each sweep size; a
    batch holds about ``--samples`` x (``--max-new-tokens`` + a 16-token prompt) tokens."""
    per_batch = args.samples * (args.max_new_tokens + 16)
    return [(target, max(1, round(target / per_batch))) for target in args.mfu_micro_tokens]


def sweep_phase(report: Report, trainer, final: str, fresh, args, clock: Clock, reserve_s: float, step_s: float) -> None:
    """The final arm with one micro-batch of about each target size per step (``sweep_plan``): each
    step joins that many fresh batches and packs them into rows enough for all of them."""
    from miles_envs.trainer.batch import pack

    base = trainer.config
    points = []
    for target, joined in sweep_plan(args):
        point = {"micro_tokens_target": target, "batches_joined": joined}
        points.append(point)
        rows = math.ceil(1.15 * target / args.row_tokens)
        if clock.left() < reserve_s + (1 + args.sweep_steps) * joined * step_s * 1.5:
            point["skipped"] = "time limit"
            continue
        trainer.config = dataclasses.replace(base, rows_per_micro_batch=rows)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed = []
        for step in range(1 + args.sweep_steps):
            batch = [t for _ in range(joined) for t in next(fresh)]
            done = attempt(report, f"{final}@{target}", f"sweep step {step}", lambda: timed_step(trainer, batch, args.device, final))
            if done is None:
                point["error"] = report["failed"].pop(f"{final}@{target}")["error"]
                free_memory(args.device)
                break
            micro = len(pack(batch, [0.0] * len(batch), [1.0] * len(batch), max_row_tokens=args.row_tokens, rows_per_micro_batch=rows))
            if step:  # the first step of a size warms its allocations up
                timed.append({"seconds": done[0], "tokens": tokens(batch), "flops": step_flops(trainer, batch), "micro_batches": micro})
        if timed:
            point |= {k: v for k, v in arm_summary(final, timed, report).items() if k != "arm"}
            point["tokens_per_micro_batch"] = statistics.mean(s["tokens"] / s["micro_batches"] for s in timed)
        if args.device == "cuda":
            point["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    trainer.config = base
    report.phase("micro_batch_sweep", {"arm": final, "row_tokens": args.row_tokens, "points": points,
                                       "how": "each step joins `batches_joined` fresh rollout batches, packed into rows of "
                                              "`row_tokens` with rows enough for one micro-batch of about the target"})


def r3_phase(report: Report, trainer, final: str, fresh, args, clock: Clock, mtp_loss: list) -> None:
    """``--pairs`` interleaved on/off pairs (fewer when the time limit comes first)."""
    on, off = [], []
    for pair in range(-1, args.pairs):  # pair -1 warms both paths up
        if pair > 0 and clock.left() < 2.5 * (on[-1] + off[-1]):
            break
        order = (True, False) if pair % 2 == 0 else (False, True)
        times = {}
        for replay in order:
            batch = next(fresh)
            times[replay], metrics = timed_step(trainer, batch if replay else without_traces(batch), args.device, final)
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
                    mfu_formula=__doc__.split("MFU = ")[1].split("\n\n")[0].replace("\n", " "), time_limit_s=args.time_limit,
                    arms=args.arms)
    report.phase("measured_matmul_peak_flops", measured_matmul_peak(args.device))
    arms = len(args.arms)
    batches_needed = (1 + arms * (1 + args.mfu_steps) + sum(j for _, j in sweep_plan(args)) * (1 + args.sweep_steps)
                      + 2 * arms + 2 * (1 + args.pairs))  # mismatch, mfu, sweep, profile + host reads, r3 pairs
    with tempfile.TemporaryDirectory() as tmp, megatron_here(args.device):
        folder = Path(tmp) / "model"
        hf_config, hf_weights = write_checkpoint(folder, args)
        report["model"]["vocab"] = hf_config.vocab_size
        batches, rollout_s = fresh_batches(folder, args, batches_needed)
        report.phase("rollout", {"batches": len(batches), "samples_per_batch": args.samples, "max_new_tokens": args.max_new_tokens,
                                 "seconds": rollout_s, "engine": f"embedded, {'bf16' if cuda else 'fp32'}, one pass for all steps",
                                 "tokens_per_step_mean": statistics.mean(tokens(b) for b in batches)})
        fresh = iter(batches)

        final = args.arms[-1]
        trainers = {}
        for name in args.arms:
            trainer = attempt(report, name, "build", lambda: make_trainer(hf_config, hf_weights, args, name))
            if trainer is not None:
                trainers[name] = trainer
        del hf_weights
        if final not in trainers:
            report.phase("summary", {"error": f"the final arm {final!r} could not be built: see failed"})
            sys.exit(1)
        first = next(fresh)
        report.phase("mismatch", {"without_r3": measure(trainers[final], first, replay=False),
                                  "with_r3": measure(trainers[final], first, replay=True)})

        def reserve_s(steps: dict) -> float:  # what the sweep, the profile and the R3 pairs will need, plus a margin
            slowest = {name: max(s["seconds"] for s in timed) for name, timed in steps.items() if timed}
            final_s = slowest.get(final, max(slowest.values(), default=0.0))
            sweep = sum((1 + args.sweep_steps) * joined for _, joined in sweep_plan(args)) * final_s
            return sweep + 2 * (args.pairs + 1) * final_s + 4 * sum(slowest.values()) + 5

        steps, mtp_loss = mfu_phase(report, trainers, fresh, args, clock, reserve_s, final)
        if final not in trainers:
            report.phase("summary", {"error": f"the final arm {final!r} failed: see failed"})
            sys.exit(1)
        final_s = max(s["seconds"] for s in steps[final])
        profile_s = 4 * sum(max(s["seconds"] for s in steps[n]) for n in trainers if steps[n])
        if args.mfu_micro_tokens:
            sweep_phase(report, trainers[final], final, fresh, args, clock, profile_s + 2 * (args.pairs + 1) * final_s, final_s)
        if clock.left() > profile_s:
            profiles, reads = {}, {}
            for name in list(trainers):
                profiles[name] = attempt(report, name, "profile", lambda: profiled_step(trainers[name], next(fresh), args.device, name))
                reads[name] = attempt(report, name, "host reads", lambda: host_read_step(trainers[name], next(fresh), args.device, name))
            report.phase("profile", profiles)
            report.phase("host_reads", reads)
        for name in [n for n in trainers if n != final]:
            drop(trainers, name, args.device)
        r3_phase(report, trainers[final], final, fresh, args, clock, mtp_loss)
        report.phase("mtp", {"loss_per_step": mtp_loss, "note": f"final trainer ({final}), every step on a batch it had not seen"})
        final_mfu, mismatch, overhead = report["mfu"][final], report["mismatch"], report["r3_overhead"]
        report.phase("summary", {  # the headline figures under the keys the README's results table reads
            "card": info["card"], "final_arm": final, "tokens_per_step": round(report["rollout"]["tokens_per_step_mean"]),
            "step_seconds_r3_on_median": statistics.median(overhead["seconds_on"]), "tokens_per_second_r3_on": final_mfu["tokens_per_second"],
            "mfu_r3_on": final_mfu["mfu_vs_datasheet"], "mfu_note": report["mfu_formula"],
            "r3_overhead_ratio": overhead["ratio_on_over_off"]["ratio"],
            "k3_kl_reduction": mismatch["without_r3"]["k3_kl"] / max(mismatch["with_r3"]["k3_kl"], 1e-30),
        })
        report.update(report.pop("summary"))
        report.path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
