"""Sandbox latency and throughput: ``print(1)`` on local and docker, cold and pooled.

    python bench/sandbox.py [--runs 200] [--cold-runs 40] [--docker-cold-runs 10] [--no-docker]

Cold = create a sandbox, run once, close it. Pooled = run in a warm sandbox of a SandboxPool.
Latency is sequential; execs/s runs with as many concurrent callers as the pool has sandboxes
(the CPU count). A bare ``bwrap python3 -c 'print(1)'`` is measured in the same run as the
reference the local numbers are relative to. Prints a table and writes bench/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from miles_envs.sandbox import SandboxPool, make_sandbox
from miles_envs.sandbox.docker_backend import docker_unavailable
from miles_envs.sandbox.local import LocalSandbox

CODE = "print(1)"
RESULTS = Path(__file__).with_name("results") / "sandbox.json"
TARGETS_MS = {"local cold": 25.0, "local pooled": 5.0, "docker pooled": 60.0}
TARGET_EXECS_PER_S = 100.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, latencies: list[float], execs_per_s: float) -> dict:
    return {
        "name": name,
        "runs": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
        "execs_per_s": execs_per_s,
    }


def bare_bwrap(runs: int) -> list[float]:
    """The floor: bubblewrap with the same namespaces starting python3 -c 'print(1)'."""
    command = LocalSandbox().command()
    command = command[: command.index("-c") + 1] + [CODE]
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, user=65534 if os.geteuid() == 0 else None)
        latencies.append(time.perf_counter() - start)
    return latencies


async def cold_once(backend: str) -> float:
    start = time.perf_counter()
    sandbox = make_sandbox(backend)
    result = await sandbox.run(CODE)
    await sandbox.close()
    assert result.stdout == "1\n", result
    return time.perf_counter() - start


async def cold(backend: str, runs: int, concurrency: int) -> tuple[list[float], float]:
    latencies = [await cold_once(backend) for _ in range(runs)]
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> float:
        async with gate:
            return await cold_once(backend)

    start = time.perf_counter()
    await asyncio.gather(*(gated() for _ in range(runs)))
    return latencies, runs / (time.perf_counter() - start)


async def pooled(backend: str, runs: int, concurrency: int) -> tuple[list[float], float]:
    async with SandboxPool(backend, size=concurrency) as pool:
        await pool.start()
        latencies = []
        for _ in range(runs):
            start = time.perf_counter()
            result = await pool.run(CODE)
            latencies.append(time.perf_counter() - start)
            assert result.stdout == "1\n", result
        start = time.perf_counter()
        await asyncio.gather(*(pool.run(CODE) for _ in range(runs)))
        return latencies, runs / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--cold-runs", type=int, default=40)
    parser.add_argument("--docker-cold-runs", type=int, default=10)
    parser.add_argument("--no-docker", action="store_true")
    args = parser.parse_args()
    concurrency = os.cpu_count() or 1

    rows = [summarize("bare bwrap python3 (reference)", bare_bwrap(args.cold_runs), float("nan"))]
    rows.append(summarize("local cold", *await cold("local", args.cold_runs, concurrency)))
    rows.append(summarize("local pooled", *await pooled("local", args.runs, concurrency)))
    skipped = None if not args.no_docker else "--no-docker"
    skipped = skipped or docker_unavailable()
    if skipped is None:
        rows.append(summarize("docker cold", *await cold("docker", args.docker_cold_runs, concurrency)))
        rows.append(summarize("docker pooled", *await pooled("docker", args.runs, concurrency)))

    reference = rows[0]["p50_ms"]
    for row in rows:
        row["p50_vs_bare_bwrap"] = row["p50_ms"] / reference
        target = TARGETS_MS.get(row["name"])
        row["target_p50_ms"] = target
        row["meets_p50_target"] = None if target is None else row["p50_ms"] <= target

    print(f"sandbox print(1), {concurrency} concurrent callers for execs/s, {platform.node()}")
    header = f"{'mode':32} {'p50 ms':>8} {'p99 ms':>8} {'execs/s':>8} {'p50/bare':>9} {'target':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        target = "" if row["target_p50_ms"] is None else f"<={row['target_p50_ms']:g}"
        print(
            f"{row['name']:32} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['execs_per_s']:8.1f} "
            f"{row['p50_vs_bare_bwrap']:9.2f} {target:>8}"
        )
    if skipped:
        print(f"docker skipped: {skipped}")
    local_pooled = next(r for r in rows if r["name"] == "local pooled")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "code": CODE,
                "cpus": concurrency,
                "rows": rows,
                "docker_skipped": skipped,
                "target_execs_per_s": TARGET_EXECS_PER_S,
                "meets_execs_target": local_pooled["execs_per_s"] >= TARGET_EXECS_PER_S,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
