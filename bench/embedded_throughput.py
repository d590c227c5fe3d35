"""Embedded-engine decode throughput on CPU: batched concurrent requests vs one request at a time.

A tiny random-init Qwen3-MoE (real Qwen3 vocabulary, 151,669 tokens) serves ``n`` concurrent
requests (batched: one forward per step for all running sequences) and the same requests one at a
time (sequential). tokens/s counts generated tokens over wall time, best of ``--repeats``
alternating runs (the CPU may be shared); the ratio is batched over sequential, both measured in
this run on the same machine.

    .venv/bin/python bench/embedded_throughput.py [--concurrency 1 8 64] [--new-tokens 32]
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
from miles_envs.engine import SamplingParams
from miles_envs.models.factory import init_model

RESULTS = Path(__file__).resolve().parent / "results"


def prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 150000, (length + i % 7,), generator=generator).tolist() for i in range(count)]


async def tokens_per_second(engine: EmbeddedEngine, batch: list[list[int]], new_tokens: int, concurrent: bool) -> float:
    params = [SamplingParams(max_new_tokens=new_tokens, seed=i) for i in range(len(batch))]
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*[engine.generate(p, s) for p, s in zip(batch, params)])
    else:
        results = [await engine.generate(p, s) for p, s in zip(batch, params)]
    elapsed = time.perf_counter() - start
    return sum(len(r.output_ids) for r in results) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--sequential-requests", type=int, default=8, help="requests timed one at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        engine = EmbeddedEngine.from_path(init_model(folder, arch="qwen3-moe", size=args.size), device="cpu")
        await tokens_per_second(engine, prompts(2, 8), 4, concurrent=True)  # warm-up
        rows = []
        for n in args.concurrency:
            batch = prompts(n, args.prompt_tokens)
            batched = sequential = 0.0
            for _ in range(args.repeats):
                batched = max(batched, await tokens_per_second(engine, batch, args.new_tokens, concurrent=True))
                alone = batch[: args.sequential_requests]
                sequential = max(sequential, await tokens_per_second(engine, alone, args.new_tokens, concurrent=False))
            rows.append({"concurrency": n, "batched_tok_s": batched, "sequential_tok_s": sequential, "ratio": batched / sequential})
        await engine.close()

    table = Table(title=f"embedded engine, qwen3-moe {args.size}, CPU ({torch.get_num_threads()} threads), {args.new_tokens} new tokens")
    for column in ("concurrent requests", "batched tok/s", "sequential tok/s", "batched / sequential"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["concurrency"]), f"{row['batched_tok_s']:.1f}", f"{row['sequential_tok_s']:.1f}", f"{row['ratio']:.2f}x")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = {"model": f"qwen3-moe/{args.size}", "device": "cpu", "threads": torch.get_num_threads(), **vars(args), "rows": rows}
    (RESULTS / "embedded_throughput.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
