"""Speculative decoding with MTP drafts in the embedded engine: tokens/s with and without, accept rate.

The target is a tiny Qwen3-MoE with one MTP layer made draftable (``miles_envs.models.toy``: main
residual branches scaled by ``--residual-scale``, MTP passing the next token's embedding through),
so the draft is right part of the time, as a trained one would be. Each setting decodes the same
requests (greedy and sampled); tokens/s are measured in this run on the same machine. The draft is
a toy: the measurement with a trained model's own MTP layer is ``bench/gpu/spec_trained.py``.

    .venv/bin/python bench/spec_decode.py [--draft-tokens 0 1 2 3] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams, SpecStats
from miles_envs.models.factory import init_model
from miles_envs.models.loading import load_checkpoint
from miles_envs.models.toy import make_draftable

RESULTS = Path(__file__).resolve().parent / "results"


async def run(engine: EmbeddedEngine, concurrency: int, new_tokens: int, temperature: float) -> dict:
    generator = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 150000, (16,), generator=generator).tolist() for _ in range(concurrency)]
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=i) for i in range(concurrency)]
    start = time.perf_counter()
    results = await asyncio.gather(*[engine.generate(p, s) for p, s in zip(batch, params)])
    elapsed = time.perf_counter() - start
    spec = sum((r.spec for r in results if r.spec), start=SpecStats())
    return {
        "tok_s": sum(len(r.output_ids) for r in results) / elapsed,
        "accept_rate": spec.accept_rate,
        "accept_length": spec.accept_length,
        "verify_ct": spec.verify_ct,
        "outputs": [r.output_ids for r in results],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--residual-scale", type=float, default=0.5)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = load_checkpoint(init_model(folder, arch="qwen3-moe", size="tiny", mtp=1), device="cpu")
        make_draftable(checkpoint.model, checkpoint.mtp, args.residual_scale)
        for temperature in (0.0, 1.0):
            for concurrency in args.concurrency:
                baseline = None
                for k in args.draft_tokens:
                    engine = EmbeddedEngine(checkpoint, draft_tokens=k)
                    await run(engine, 1, 4, temperature)  # warm-up
                    result = await run(engine, concurrency, args.new_tokens, temperature)
                    await engine.close()
                    baseline = baseline or result
                    rows.append({
                        "temperature": temperature, "concurrency": concurrency, "draft_tokens": k,
                        "tok_s": result["tok_s"], "speedup": result["tok_s"] / baseline["tok_s"],
                        "accept_rate": result["accept_rate"], "accept_length": result["accept_length"],
                        "same_greedy_output": temperature > 0 or result["outputs"] == baseline["outputs"],
                    })

    table = Table(title=f"MTP speculative decoding, tiny qwen3-moe on CPU, residual scale {args.residual_scale}")
    for column in ("temperature", "concurrent", "draft tokens", "tok/s", "vs no spec", "accept rate", "accept length", "greedy identical"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['temperature']:.1f}", str(r["concurrency"]), str(r["draft_tokens"]), f"{r['tok_s']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['accept_rate']:.2f}", f"{r['accept_length']:.2f}",
                      "-" if r["temperature"] > 0 else str(r["same_greedy_output"]))
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spec_decode.json").write_text(json.dumps({"model": "qwen3-moe/tiny+mtp1", "device": "cpu", **vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
