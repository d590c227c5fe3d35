"""Sandboxes under RL load: N concurrent sessions through a SandboxPool, local and docker backends.

    python bench/sandbox_load.py [--sessions 128 512 1024] [--backends local docker] [--repeats 1]
                                 [--execs 4] [--pool-size 4xCPUs] [--docker-pool-size 4xCPUs] [--max-starting 4]

Each session asks the pool for a sandbox at the same moment as all the others (create, or take a
warm one), runs ``--execs`` short programs that build on each other (Python with session state,
a file written then read back with bash, a small assertion suite), checks every output, and closes.
The pool holds ``--pool-size`` sandboxes, so most of N sessions queue: *acquire* is that wait plus
any start, *start* a cold start alone, *exec* one execution in a held sandbox. Each (backend, N,
repeat) cell runs in its own process; after it exits this script counts what it left on the host
(processes, containers, mounts, temp dirs, cgroups carrying its run id) without reaping anything.
Peak memory is sampled every 0.5 s: PSS of the cell's process tree plus, for docker, the memory
cgroups of its containers (containerd shims are not counted). Latencies are wall time on a shared
machine; host CPU per exec (the cell process's own CPU time) is the contention-robust figure, and
for docker the CPU that dockerd, containerd and the shims spent per exec during the cell (any
other docker user on the machine counts in it too).
Prints a table and writes bench/results/sandbox_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results") / "sandbox_load.json"
EXEC_P99_TARGET_MS = 250.0
TARGET_SESSIONS = 1024

DATA = [(i * 7919) % 1000 for i in range(2000)]
# (language, code, expected stdout): realistic small tool calls that share session state.
PROGRAMS = [
    ("python", "data = [(i * 7919) % 1000 for i in range(2000)]\nprint(sum(sorted(data)[:10]))",
     f"{sum(sorted(DATA)[:10])}\n"),
    ("python", "import json\nwith open('stats.json', 'w') as f:\n    json.dump({'n': len(data), 'max': max(data)}, f)\n"
               "print(len(set(data)))", f"{len(set(DATA))}\n"),
    ("bash", "cat stats.json; echo; ls | wc -l", '{"n": 2000, "max": 999}\n1\n'),
    ("python", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
               "assert [fib(i) for i in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\nassert fib(90) == 2880067194370816120\n"
               "print('3 passed')", "3 passed\n"),
]


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1e3}


# -- one cell, in its own process ------------------------------------------------------------------
def tree_pss_bytes(root: int) -> int:
    from miles_envs.sandbox.reaper import ProcessTree

    total = 0
    for pid in ProcessTree().below(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


DOCKER_DAEMONS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2")


def daemon_cpu_s() -> float:
    """CPU seconds used so far by dockerd, containerd and the container shims (whoever they serve)."""
    from miles_envs.sandbox.reaper import process_parents

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in process_parents():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if name in DOCKER_DAEMONS:
            total += (int(rest[11]) + int(rest[12])) / ticks  # utime, stime
    return total


def container_memory_bytes(client, run_id: str) -> int:
    from miles_envs.sandbox.reaper import run_containers

    total = 0
    for container in run_containers(client, run_id):
        try:
            total += int(Path(f"/sys/fs/cgroup/memory/docker/{container.id}/memory.usage_in_bytes").read_text())
        except OSError:
            pass
    return total


async def sample_memory(backend: str, peak: list[int], stop: asyncio.Event) -> None:
    from miles_envs.sandbox.reaper import current_run

    client = None
    if backend == "docker":
        from miles_envs.sandbox.docker_backend import docker_client

        client = docker_client()
    run_id = current_run().id
    while not stop.is_set():
        used = tree_pss_bytes(os.getpid())
        if client is not None:
            used += await asyncio.to_thread(container_memory_bytes, client, run_id)
        peak[0] = max(peak[0], used)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def run_cell(backend: str, sessions: int, execs: int, pool_size: int, max_starting: int) -> dict:
    from miles_envs.sandbox import SandboxError, SandboxPool
    from miles_envs.sandbox.reaper import current_run

    acquire, run, failures = [], [], {"start": 0, "exec": 0, "wrong_output": 0}
    programs = [PROGRAMS[i % len(PROGRAMS)] for i in range(execs)]
    pool = SandboxPool(backend, size=pool_size, max_starting=max_starting, start_budget_s=60.0, timeout=10.0)
    gate = asyncio.Event()

    async def session() -> None:
        await gate.wait()
        requested = time.perf_counter()
        try:
            async with pool.session() as s:
                acquire.append(time.perf_counter() - requested)
                for language, code, expected in programs:
                    began = time.perf_counter()
                    result = await s.run(code, language=language)
                    run.append(time.perf_counter() - began)
                    if result.error is not None:
                        failures["exec"] += 1
                    elif result.stdout != expected:
                        failures["wrong_output"] += 1
        except SandboxError:
            failures["start"] += 1

    stop, peak = asyncio.Event(), [0]
    sampler = asyncio.create_task(sample_memory(backend, peak, stop))
    tasks = [asyncio.create_task(session()) for _ in range(sessions)]
    await asyncio.sleep(0)
    cpu0, wall0, daemons0 = time.process_time(), time.perf_counter(), daemon_cpu_s()
    gate.set()  # every session asks at the same moment
    await asyncio.gather(*tasks)
    wall, cpu, daemons = time.perf_counter() - wall0, time.process_time() - cpu0, daemon_cpu_s() - daemons0
    metrics = pool.metrics()
    await pool.close()
    stop.set()
    await sampler
    return {
        "backend": backend,
        "sessions": sessions,
        "execs_per_session": execs,
        "pool_size": pool_size,
        "max_starting": max_starting,
        "run_id": current_run().id,
        "wall_s": wall,
        "sessions_per_s": sessions / wall,
        "execs_per_s": len(run) / wall,
        "host_cpu_ms_per_exec": cpu / max(len(run), 1) * 1e3,
        "docker_daemons_cpu_ms_per_exec": daemons / max(len(run), 1) * 1e3 if backend == "docker" else None,
        "acquire": percentiles(acquire),
        "start": {k: metrics[f"start_{k}"] for k in ("p50_ms", "p99_ms", "max_ms")},
        "starts": metrics["start_count"],
        "exec": percentiles(run),
        "execs": len(run),
        "failures": failures,
        "start_failure_rate": failures["start"] / sessions,
        "queue_depth_max": metrics["queue_depth_max"],
        "start_queue_depth_max": metrics["start_queue_depth_max"],
        "peak_memory_mb": peak[0] / 2**20,
        "peak_rss_cell_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# -- the driver ------------------------------------------------------------------------------------
def count_leftovers(run_id: str, backend: str) -> dict[str, int]:
    from miles_envs.sandbox.reaper import leftovers

    docker = None
    if backend == "docker":
        from miles_envs.sandbox.docker_backend import docker_client

        docker = docker_client()
    return {kind: len(items) for kind, items in leftovers(run_id, docker).items()}


def run_cell_process(args: argparse.Namespace, backend: str, sessions: int) -> dict:
    pool_size = args.docker_pool_size if backend == "docker" else args.pool_size
    command = [sys.executable, __file__, "--cell", backend, str(sessions), "--execs", str(args.execs),
               "--pool-size", str(pool_size), "--max-starting", str(args.max_starting)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"cell {backend} x{sessions} failed:\n{done.stderr[-3000:]}")
    cell = json.loads(done.stdout.strip().splitlines()[-1])
    cell["leftovers"] = count_leftovers(cell["run_id"], backend)
    return cell


def summarize(cells: list[dict]) -> dict:
    """The repeats of one (backend, sessions): medians, and the spread of the exec p99."""
    p99s = [c["exec"]["p99_ms"] for c in cells]
    keys = ("wall_s", "sessions_per_s", "execs_per_s", "host_cpu_ms_per_exec", "peak_memory_mb")
    row = {k: statistics.median(c[k] for c in cells) for k in keys}
    daemons = [c["docker_daemons_cpu_ms_per_exec"] for c in cells if c["docker_daemons_cpu_ms_per_exec"] is not None]
    row["docker_daemons_cpu_ms_per_exec"] = statistics.median(daemons) if daemons else None
    for part in ("acquire", "start", "exec"):
        row[part] = {k: statistics.median(c[part][k] for c in cells) if cells[0][part][k] is not None else None
                     for k in ("p50_ms", "p99_ms", "max_ms")}
    row.update(
        backend=cells[0]["backend"], sessions=cells[0]["sessions"], pool_size=cells[0]["pool_size"],
        repeats=len(cells), exec_p99_ms_min=min(p99s), exec_p99_ms_max=max(p99s),
        start_failures=sum(c["failures"]["start"] for c in cells),
        exec_failures=sum(c["failures"]["exec"] + c["failures"]["wrong_output"] for c in cells),
        start_failure_rate=sum(c["failures"]["start"] for c in cells) / sum(c["sessions"] for c in cells),
        leftovers=sum(sum(c["leftovers"].values()) for c in cells),
        leftovers_by_kind={k: sum(c["leftovers"][k] for c in cells) for k in cells[0]["leftovers"]},
    )
    return row


def print_table(rows: list[dict], machine: str) -> None:
    print(f"sandbox load: concurrent sessions through a pool; {machine}")
    header = (f"{'backend':7} {'sessions':>8} {'pool':>5} {'acquire p50/p99/max ms':>24} {'start p50/p99 ms':>17} "
              f"{'exec p50/p99/max ms':>22} {'fail':>5} {'execs/s':>8} {'CPU ms/exec':>11} {'peak MB':>8} {'left':>5}")
    print(header)
    print("-" * len(header))

    def fmt(part: dict, keys=("p50_ms", "p99_ms", "max_ms")) -> str:
        return "/".join("-" if part[k] is None else f"{part[k]:.0f}" for k in keys)

    for r in rows:
        print(f"{r['backend']:7} {r['sessions']:8} {r['pool_size']:5} {fmt(r['acquire']):>24} "
              f"{fmt(r['start'], ('p50_ms', 'p99_ms')):>17} {fmt(r['exec']):>22} "
              f"{r['start_failures'] + r['exec_failures']:5} {r['execs_per_s']:8.0f} {r['host_cpu_ms_per_exec']:11.2f} "
              f"{r['peak_memory_mb']:8.0f} {r['leftovers']:5}"
              + ("" if r["docker_daemons_cpu_ms_per_exec"] is None
                 else f"   (dockerd/containerd/shims: {r['docker_daemons_cpu_ms_per_exec']:.2f} CPU ms/exec)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--backends", nargs="+", default=["local", "docker"], choices=["local", "docker"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--execs", type=int, default=4, help="executions per session")
    # 4 sandboxes per core: more only queues the same CPU inside the sandboxes instead of in the pool.
    parser.add_argument("--pool-size", type=int, default=4 * (os.cpu_count() or 1), help="warm local sandboxes")
    parser.add_argument("--docker-pool-size", type=int, default=4 * (os.cpu_count() or 1), help="warm containers")
    parser.add_argument("--max-starting", type=int, default=4, help="sandboxes starting at once")
    parser.add_argument("--cell", nargs=2, metavar=("BACKEND", "SESSIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        backend, sessions = args.cell[0], int(args.cell[1])
        pool_size = min(args.pool_size, sessions)
        print(json.dumps(asyncio.run(run_cell(backend, sessions, args.execs, pool_size, args.max_starting))))
        return

    from miles_envs.sandbox.docker_backend import docker_unavailable

    skipped = {}
    if "docker" in args.backends and (reason := docker_unavailable()):
        skipped["docker"] = reason
    rows, cells = [], []
    for backend in (b for b in args.backends if b not in skipped):
        for sessions in args.sessions:
            done = [run_cell_process(args, backend, sessions) for _ in range(args.repeats)]
            cells += done
            rows.append(summarize(done))
            print(f"  {backend} x{sessions}: exec p99 {rows[-1]['exec']['p99_ms']:.0f} ms, "
                  f"{rows[-1]['wall_s']:.1f} s", flush=True)
    load = os.getloadavg()
    machine = f"{platform.node()}, {os.cpu_count()} cores, load average at end {load[0]:.1f} (shared machine)"
    print_table(rows, machine)
    local_target = next((r for r in rows if r["backend"] == "local" and r["sessions"] == TARGET_SESSIONS), None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": machine,
        "cpus": os.cpu_count(),
        "loadavg_end": load,
        "settings": {k: getattr(args, k) for k in ("sessions", "backends", "repeats", "execs", "pool_size",
                                                    "docker_pool_size", "max_starting")},
        "programs": [{"language": language, "code": code} for language, code, _ in PROGRAMS],
        "targets": {"start_failures": 0, "leftovers": 0, f"local_exec_p99_ms_at_{TARGET_SESSIONS}": EXEC_P99_TARGET_MS},
        "meets_local_exec_p99_target": None if local_target is None
        else local_target["exec"]["p99_ms"] <= EXEC_P99_TARGET_MS,
        "skipped": skipped,
        "rows": rows,
        "cells": cells,
    }, indent=2) + "\n")
    for backend, reason in skipped.items():
        print(f"{backend} skipped: {reason}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
