"""Search throughput: queries/s at batch 1 and batch 256, local BM25 and over HTTP ``/retrieve``.

Corpus: the fictional encyclopedia generator at ``--scale`` (about 280 documents per unit);
queries: its questions. Prints a table and writes bench/results/search.json.

    python bench/search.py [--scale 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from miles_envs.envs.search_world import build_world
from miles_envs.search.bm25 import BM25Index
from miles_envs.search.documents import document_from_record
from miles_envs.search.http_retriever import HTTPRetriever, serve

BATCH = 256
TOP_K = 3
RESULTS = Path(__file__).parent / "results" / "search.json"


def best_rate(run, queries: list[str], batch: int, rounds: int) -> float:
    """Queries/s of the fastest of ``rounds`` passes over ``queries`` in chunks of ``batch``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for offset in range(0, len(queries), batch):
            run(queries[offset : offset + batch])
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    world = build_world(scale=args.scale)
    start = time.perf_counter()
    index = BM25Index.build(document_from_record(row) for row in world.documents)
    build_s = time.perf_counter() - start
    queries = [q["question"] for q in world.questions][:BATCH]
    queries = (queries * (BATCH // len(queries) + 1))[:BATCH]

    server = serve(index.query, port=0)
    client = HTTPRetriever(f"http://127.0.0.1:{server.server_address[1]}/retrieve")
    loop = asyncio.new_event_loop()

    def over_http(batch: list[str]) -> None:
        loop.run_until_complete(client.search(batch, TOP_K))

    rows = []
    for backend, run in (("bm25 (in process)", lambda batch: index.query(batch, TOP_K)), ("bm25 via HTTP /retrieve", over_http)):
        single = best_rate(run, queries, 1, args.rounds)
        batched = best_rate(run, queries, BATCH, args.rounds)
        rows.append({"backend": backend, "qps_batch_1": single, "qps_batch_256": batched, "batch_speedup": batched / single})
    loop.run_until_complete(client.aclose())
    loop.close()
    server.shutdown()

    table = Table(title=f"search throughput, {len(index)} documents, top-{TOP_K}")
    for column in ("backend", "queries/s @1", f"queries/s @{BATCH}", "speedup"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["backend"], f"{row['qps_batch_1']:.0f}", f"{row['qps_batch_256']:.0f}", f"{row['batch_speedup']:.1f}x")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "documents": len(index), "top_k": TOP_K, "queries": len(queries), "build_s": build_s,
        "machine": platform.processor() or platform.machine(), "results": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
