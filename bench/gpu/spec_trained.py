"""Speculative decoding with the pretrained MoE's own MTP layer in the embedded engine on the GPU.

The draft is the MTP layer pretrained with the model (no draft built to equal the target). Each
setting decodes the same requests: env prompts (GuessNumber, ToolCalc, Echo) in the chat
template, ``--new-tokens`` tokens each with the stop tokens ignored, so every run decodes the same
number of tokens (as ``ignore_eos`` benchmarks do; past the end of a turn the model writes the
next turns of the transcript itself). tokens/s = generated tokens / wall time; plain (0 drafts)
and speculative runs alternate ``--repeats`` times, and the speedup is the geometric mean of the
per-repeat ratios with a 95% t-interval. Every batch shape is warmed up first, and the repeat
loop is the outer one, so a time limit leaves every setting with the same number of repeats. At
T=0 it also checks that the speculative output equals the plain one (bf16 batched numerics can
flip a near-tie; the share of identical requests is reported).

    python bench/gpu/spec_trained.py --model /tmp/miles-moe       # writes bench/results/gpu_spec_decode.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, mean_ci, ratio_ci, write  # noqa: E402

from miles_envs.engine import SamplingParams, SpecStats  # noqa: E402

PROMPT_ENVS = ("miles/GuessNumber-v0", "miles/ToolCalc-v0", "miles/Echo-v0")


def env_prompts(renderer, count: int, seed: int) -> list[list[int]]:
    from miles_envs.registry import make

    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        env = make(PROMPT_ENVS[i % len(PROMPT_ENVS)])
        messages, info = env.reset(seed=rng.randrange(2**31))
        prompts.append(renderer.prompt_ids(messages, tools=info.get("tools")))
        env.close()
    return prompts


async def decode(engine, prompts: list[list[int]], new_tokens: int, temperature: float) -> dict:
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=i) for i in range(len(prompts))]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # a stalled engine fails the run instead of hanging it
    results = await asyncio.wait_for(asyncio.gather(*[engine.generate(p, s) for p, s in zip(prompts, params)]), 120)
    elapsed = time.perf_counter() - start
    spec = sum((r.spec for r in results if r.spec), start=SpecStats())
    return {"tok_s": sum(len(r.output_ids) for r in results) / elapsed, "accept_rate": spec.accept_rate,
            "accept_length": spec.accept_length, "outputs": [r.output_ids for r in results]}


def spec_row(temperature: float, concurrency: int, k: int, runs: dict[int, list[dict]]) -> dict:
    """Speculative (``k`` drafts) vs plain over the paired repeats of one setting."""
    plain = runs[0]
    same = [a == b for r_spec, r_plain in zip(runs[k], plain) for a, b in zip(r_spec["outputs"], r_plain["outputs"])]
    row = {
        "temperature": temperature, "concurrency": concurrency, "draft_tokens": k,
        "plain_tok_s": mean_ci([r["tok_s"] for r in plain]),
        "spec_tok_s": mean_ci([r["tok_s"] for r in runs[k]]),
        "speedup": ratio_ci([r["tok_s"] for r in runs[k]], [r["tok_s"] for r in plain]),
        "accept_rate": mean_ci([r["accept_rate"] for r in runs[k]]),
        "accept_length": mean_ci([r["accept_length"] for r in runs[k]]),
        "greedy_identical_share": sum(same) / len(same) if temperature == 0 else None,
    }
    print(f"spec T={temperature} c={concurrency} k={k}: {row['plain_tok_s']['mean']:.0f} -> {row['spec_tok_s']['mean']:.0f} "
          f"tok/s ({row['speedup']['ratio']:.2f}x), accept {row['accept_rate']['mean']:.2f}, "
          f"len {row['accept_length']['mean']:.2f}", flush=True)
    return row


def spec_report(folder: Path, args) -> dict:
    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.models.loading import load_checkpoint

    # stop tokens ignored: every request decodes exactly --new-tokens tokens
    checkpoint = dataclasses.replace(load_checkpoint(folder, device=args.device, dtype=torch.bfloat16), eos_token_ids=[])
    drafts = sorted({0, *args.spec_drafts})
    engines = {k: EmbeddedEngine(checkpoint, draft_tokens=k, max_running=max(args.concurrency)) for k in drafts}
    from miles_envs.chat.renderer import ChatRenderer

    prompts = env_prompts(ChatRenderer(checkpoint.tokenizer), max(args.concurrency), args.seed)

    settings = [(temperature, concurrency) for temperature in (0.0, 1.0) for concurrency in args.concurrency]
    runs = {setting: {k: [] for k in engines} for setting in settings}

    async def go():
        try:
            for temperature, concurrency in settings:  # warm-up at every batch shape: kernels, allocator
                for engine in engines.values():
                    await decode(engine, prompts[:concurrency], 8, temperature)
            deadline = time.perf_counter() + args.spec_time_limit
            # repeats outermost: a time limit costs every setting the same repeats, never a whole setting
            for repeat in range(args.repeats):
                if repeat >= 2 and time.perf_counter() > deadline:
                    print(f"spec: time limit reached after {repeat} repeats", flush=True)
                    break
                for setting in settings:
                    for k, engine in engines.items():
                        runs[setting][k].append(await decode(engine, prompts[: setting[1]], args.new_tokens, setting[0]))
        finally:
            for engine in engines.values():
                await engine.close()

    asyncio.run(go())
    rows = [spec_row(temperature, concurrency, k, runs[(temperature, concurrency)])
            for temperature, concurrency in settings for k in engines if k]
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(folder),
        "draft": "the model's own pretrained MTP layer, applied recursively (NextN)",
        "settings": {"new_tokens": args.new_tokens, "repeats": args.repeats, "concurrency": args.concurrency,
                     "draft_tokens": drafts, "engine": "embedded, bfloat16", "stop_tokens": "ignored",
                     "time_limit_s": args.spec_time_limit},
        "rows": rows,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--spec-drafts", type=int, nargs="+", default=[0, 1, 2, 3], help="draft tokens; 0 = plain")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spec-time-limit", type=float, default=600.0, help="seconds; later repeats (past 2) are skipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder written by pretrain_moe.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "gpu_spec_decode.json"))
    add_arguments(parser)
    args = parser.parse_args()
    report = spec_report(Path(args.model), args)
    print(f"wrote {write(args.out, report)}")


if __name__ == "__main__":
    main()
