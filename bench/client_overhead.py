"""Client CPU per ``POST /generate``: candidate HTTP clients and JSON codecs side by side, in one run.

A canned-reply server runs in another process (its CPU is not counted); the client process's CPU
time (``time.process_time``) over a batch of requests at fixed concurrency, divided by the batch,
is the per-request cost. Bodies carry 1 KB to 64 KB of token ids; responses carry 64 output tokens
with logprobs, and optionally the routing rows of one turn (96 rows of a 48-layer top-8 MoE, base64
int32, as SGLang sends them). Medians over repeats, with the spread (min–max).

Candidates: httpx (the previous client: stdlib json, sharded pools; and one plain pool), httpx + orjson, aiohttp +
orjson, h11 on asyncio streams + orjson, httptools in an asyncio.Protocol (``agents.http_pool``) +
orjson and + msgspec; then the whole ``SGLangEngine.generate`` (request building, transport,
parsing into a ``Generation``) on the chosen one, twice: handed a plain list (the history's JSON
encoded whole every request), and handed the episode's ``TokenIds`` stream as the env loop does
(earlier turns' JSON kept, this turn's 96 ids encoded).

    python bench/client_overhead.py [--requests 400] [--repeats 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BODY_KB = (1, 8, 64)
OUTPUT_TOKENS = 64
ROUTING = (96, 48, 8)  # rows (observation + outputs of one turn) x layers x topk: Qwen3-30B-A3B
TARGET_US = 100.0


# ----------------------------------------------------------------------------- canned server (other process)


def canned_response(routed: bool) -> bytes:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, OUTPUT_TOKENS).tolist()
    meta = {
        "id": "x", "finish_reason": {"type": "stop", "matched": 151645}, "prompt_tokens": 1000,
        "weight_version": "default", "completion_tokens": OUTPUT_TOKENS, "cached_tokens": 900,
        "output_token_logprobs": [[float(-rng.random()), t, None] for t in ids],
    }
    if routed:
        rows = rng.integers(0, 128, ROUTING, dtype=np.int32)
        meta["routed_experts"] = base64.b64encode(rows.tobytes()).decode()
    return json.dumps({"text": "", "output_ids": ids, "meta_info": meta}).encode()


def serve() -> None:
    from miles_envs.serving import HTTPServer, read_body, run_forever, send_reply

    import orjson

    replies = {False: canned_response(False), True: canned_response(True)}

    async def app(scope, receive, send):
        if scope["type"] == "http":
            body = orjson.loads(await read_body(receive) or b"{}")
            await send_reply(send, 200, replies[bool(body.get("return_routed_experts"))])

    run_forever(HTTPServer(app), lambda s: print(s.url, flush=True))


# ----------------------------------------------------------------------------- candidates


def request_body(kb: int) -> dict:
    n = kb * 1024 // 7  # "151644," is 7 bytes
    ids = np.random.default_rng(kb).integers(100000, 151000, n).tolist()
    return {"input_ids": ids, "sampling_params": {"temperature": 1.0, "max_new_tokens": 64, "no_stop_trim": True},
            "return_logprob": True, "stream": False}


def _httpx_client(url: str, connections: int = 64):
    import httpx

    return httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=connections), timeout=60)


class HttpxSharded:
    """The previous client: stdlib json through httpx, connections spread over small AsyncClients of
    8 (one large pool rescans every connection per request), a LIFO stack of slots choosing one."""

    name = "httpx + json, sharded pools (previous client)"

    def __init__(self, url: str) -> None:
        self.clients = [_httpx_client(url, 8) for _ in range(8)]
        self.slots = [shard for shard in reversed(range(8)) for _ in range(8)]
        self.free = asyncio.Event()

    async def post(self, path: str, body: dict) -> dict:
        while not self.slots:
            self.free.clear()
            await self.free.wait()
        shard = self.slots.pop()
        try:
            return (await self.clients[shard].post(path, json=body)).json()
        finally:
            self.slots.append(shard)
            self.free.set()

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


class Httpx:
    name = "httpx + json, one pool"

    def __init__(self, url: str) -> None:
        self.client = _httpx_client(url)

    async def post(self, path: str, body: dict) -> dict:
        return (await self.client.post(path, json=body)).json()

    async def close(self) -> None:
        await self.client.aclose()


class HttpxOrjson(Httpx):
    name = "httpx + orjson, one pool"

    async def post(self, path: str, body: dict) -> dict:
        import orjson

        response = await self.client.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
        return orjson.loads(response.content)


class AiohttpOrjson:
    name = "aiohttp + orjson"

    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def post(self, path: str, body: dict) -> dict:
        import orjson

        async with self.session.post(self.url + path, data=orjson.dumps(body), headers={"content-type": "application/json"}) as r:
            return orjson.loads(await r.read())

    async def close(self) -> None:
        await self.session.close()


class H11Streams:
    """A minimal pooled client: h11 state machine over asyncio streams."""

    name = "h11 on asyncio streams + orjson"

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname, parts.port, parts.netloc
        self.idle: list = []

    async def post(self, path: str, body: dict) -> dict:
        import orjson

        data = orjson.dumps(body)
        while self.idle:  # a kept-alive connection the server closed meanwhile is replaced, as pooled clients do
            conn, reader, writer = self.idle.pop()
            conn.start_next_cycle()
            chunks = await self._exchange(conn, reader, writer, path, data)
            if chunks is not None:
                return orjson.loads(b"".join(chunks))
        import h11

        reader, writer = await asyncio.open_connection(self.host, self.port)
        return orjson.loads(b"".join(await self._exchange(h11.Connection(h11.CLIENT), reader, writer, path, data)))

    async def _exchange(self, conn, reader, writer, path: str, data: bytes) -> list[bytes] | None:
        import h11

        headers = [("host", self.netloc), ("content-type", "application/json"), ("content-length", str(len(data)))]
        writer.write(conn.send(h11.Request(method="POST", target=path, headers=headers)) + conn.send(h11.Data(data=data))
                     + conn.send(h11.EndOfMessage()))
        chunks = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                received = await reader.read(262144)
                if not received and not chunks:
                    writer.close()
                    return None
                conn.receive_data(received)
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.idle.append((conn, reader, writer))
                return chunks

    async def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()


class PoolOrjson:
    name = "httptools protocol (http_pool) + orjson"

    def __init__(self, url: str) -> None:
        from miles_envs.agents.http_pool import ConnectionPool

        self.pool = ConnectionPool(url, max_connections=64)

    async def post(self, path: str, body: dict) -> dict:
        import orjson

        return orjson.loads((await self.pool.request("POST", path, orjson.dumps(body), timeout=60)).content)

    async def close(self) -> None:
        await self.pool.aclose()


class PoolMsgspec(PoolOrjson):
    name = "httptools protocol (http_pool) + msgspec"

    async def post(self, path: str, body: dict) -> dict:
        import msgspec

        return msgspec.json.decode((await self.pool.request("POST", path, msgspec.json.encode(body), timeout=60)).content)


class Engine:
    """The whole SGLangEngine.generate on the chosen transport (request building and Generation parsing included),
    given the history as a plain list: its JSON is encoded whole on every request."""

    name = "SGLangEngine.generate, plain list (whole history encoded)"

    def __init__(self, url: str) -> None:
        from miles_envs.agents.sglang import SGLangEngine

        self.engine = SGLangEngine(url, context_length=1 << 20, num_layers=ROUTING[1], topk=ROUTING[2])

    def prepare(self, body: dict, count: int) -> None:
        pass

    def history(self, body: dict) -> list[int]:
        return body["input_ids"]

    async def post(self, path: str, body: dict) -> object:
        from miles_envs.engine import SamplingParams

        routed = bool(body.get("return_routed_experts"))
        input_ids = self.history(body)
        start = len(input_ids) - (ROUTING[0] - OUTPUT_TOKENS + 1)  # rows of the last observation and the outputs
        return await self.engine.generate(input_ids, SamplingParams(max_new_tokens=64),
                                          return_routed_experts=routed, routed_experts_start=start)

    async def close(self) -> None:
        await self.engine.close()


class EngineStream(Engine):
    """As the env loop calls it: the history is the episode's ``TokenIds`` stream, whose earlier turns were
    sent before (their JSON is kept), and this turn appended the last observation and reply (96 ids)."""

    name = "SGLangEngine.generate, episode stream (as the loop sends it)"

    def prepare(self, body: dict, count: int) -> None:
        from miles_envs.agents.sglang_wire import ids_json
        from miles_envs.token_ids import TokenIds

        ids = body["input_ids"]
        self.streams = []  # the previous batch's streams are freed here, not inside a timed batch
        for _ in range(count):  # the earlier turns: sent (and encoded) before this request
            stream = TokenIds(ids[:-ROUTING[0]])
            ids_json(stream)
            self.streams.append(stream)
        self.next_stream = iter(self.streams)
        gc.collect()  # streams made turns ago are old objects, not young ones each collection walks

    def history(self, body: dict) -> list[int]:
        stream = next(self.next_stream)
        stream.extend(body["input_ids"][-ROUTING[0]:])  # this turn's ids, appended as the loop does
        return stream


CANDIDATES = [HttpxSharded, Httpx, HttpxOrjson, AiohttpOrjson, H11Streams, PoolOrjson, PoolMsgspec, Engine, EngineStream]


# ----------------------------------------------------------------------------- measurement


async def cpu_per_request(candidate, path: str, body: dict, requests: int, concurrency: int) -> float:
    """Client process CPU µs per request for one batch (after a warm-up that opens the connections)."""
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            await candidate.post(path, body)

    prepare = getattr(candidate, "prepare", lambda body, count: None)
    prepare(body, concurrency * 2)
    await asyncio.gather(*(one() for _ in range(concurrency * 2)))
    prepare(body, requests)  # outside the timed batch: what earlier turns already sent
    t0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(requests)))
    return (time.process_time() - t0) / requests * 1e6


async def measure(url: str, requests: int, repeats: int, concurrency: int) -> list[dict]:
    bodies = {kb: request_body(kb) for kb in BODY_KB}
    clients = [cls(url) for cls in CANDIDATES]
    samples: dict[tuple, list[float]] = {}
    try:
        for _ in range(repeats):  # interleaved, so drift in machine load hits every candidate alike
            for client in clients:
                for routed in (False, True):
                    for kb, body in bodies.items():
                        body = {**body, "return_routed_experts": True, "routed_experts_start_len": 0} if routed else body
                        us = await cpu_per_request(client, "/generate", body, requests, concurrency)
                        samples.setdefault((client.name, routed, kb), []).append(us)
    finally:
        for client in clients:
            await client.close()
    return [
        {"client": name, "response": "logprobs + routing" if routed else "logprobs", "body_kb": kb,
         "cpu_us_median": statistics.median(v), "cpu_us_min": min(v), "cpu_us_max": max(v), "repeats": len(v)}
        for (name, routed, kb), v in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        rows = asyncio.run(measure(url, args.requests, args.repeats, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(rows, args)


def report(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client CPU µs per /generate (median of {args.repeats}, min–max), concurrency {args.concurrency}")
    table.add_column("client")
    table.add_column("response")
    for kb in BODY_KB:
        table.add_column(f"{kb} KB body", justify="right")
    keys = sorted({(r["client"], r["response"]) for r in rows}, key=lambda k: [c.name for c in CANDIDATES].index(k[0]))
    for name, response in keys:
        cells = {r["body_kb"]: r for r in rows if (r["client"], r["response"]) == (name, response)}
        table.add_row(name, response, *(f"{cells[kb]['cpu_us_median']:.0f} ({cells[kb]['cpu_us_min']:.0f}–{cells[kb]['cpu_us_max']:.0f})" for kb in BODY_KB))
    Console().print(table)
    chosen = [r for r in rows if r["client"] == EngineStream.name]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "client_overhead.json"
    out.write_text(json.dumps({
        "method": "client process CPU (time.process_time) per request, canned-reply server in another process",
        "requests_per_batch": args.requests, "repeats": args.repeats, "concurrency": args.concurrency,
        "output_tokens": OUTPUT_TOKENS, "routing_rows_layers_topk": ROUTING, "target_us": TARGET_US,
        "rows": rows,
        "chosen_median_us_by_body": {f"{r['body_kb']}KB/{r['response']}": r["cpu_us_median"] for r in chosen},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
