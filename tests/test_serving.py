"""The shared server stack: body-size limit, idle keep-alive timeout, graceful shutdown, fault layer."""

import asyncio

import httpx
import pytest

from miles_envs.serving import Fault, FaultLayer, HTTPServer, ServerLimits, read_body, send_reply


async def echo_length(scope, receive, send):
    """Answers the body's length; ``/slow`` first waits for ``release``."""
    body = await read_body(receive)
    if scope["path"] == "/slow":
        await RELEASE.wait()
    await send_reply(send, 200, str(len(body)).encode(), b"text/plain")


RELEASE = asyncio.Event()


async def raw_exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send one request on a fresh socket; return (everything read until the server closes, closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(65536), 30)
    rest = await asyncio.wait_for(reader.read(), 30)  # b"" once the server has closed the connection
    writer.close()
    return data + rest, True


def post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def test_oversized_body_gets_413_and_a_closed_connection_others_unaffected():
    async with HTTPServer(echo_length, limits=ServerLimits(max_body_bytes=1000)) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.post("/", content=b"x" * 1000)).text == "1000"  # a kept-alive neighbour
            response, closed = await raw_exchange(server.port, post("/", b"x" * 1001))
            assert response.startswith(b"HTTP/1.1 413") and b"limit of 1000 bytes" in response and closed
            chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"y" * 512 + b"\r\n" * 1
            chunked += b"200\r\n" + b"y" * 512 + b"\r\n0\r\n\r\n"
            response, closed = await raw_exchange(server.port, chunked)
            assert response.startswith(b"HTTP/1.1 413") and closed  # counted as it arrives, no length declared
            assert (await client.post("/", content=b"z" * 10)).text == "10"


async def test_idle_keep_alive_connections_are_closed_after_the_timeout():
    async with HTTPServer(echo_length, limits=ServerLimits(keep_alive_s=0.2)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/", b"abc"))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        assert await asyncio.wait_for(reader.read(3), 30) == b"3"
        assert await asyncio.wait_for(reader.read(), 30) == b""  # the server hung up on the idle connection
        writer.close()


async def test_graceful_shutdown_finishes_running_requests():
    RELEASE.clear()
    server = await HTTPServer(echo_length).start()
    async with httpx.AsyncClient(base_url=server.url) as client:
        running = asyncio.create_task(client.post("/slow", content=b"abcd"))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.05)
        RELEASE.set()
        assert (await running).text == "4"
        await stopping


async def test_fault_layer_applies_faults_in_arrival_order_then_passes_through():
    layer = FaultLayer(echo_length, frozenset({"/"}))
    layer.inject(Fault.server_error(502))
    layer.inject(Fault.malformed_json())
    layer.inject(Fault.disconnect())
    async with HTTPServer(layer) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.post("/", content=b"12345678")).status_code == 502
            truncated = await client.post("/", content=b"1234567890")
            assert (truncated.status_code, truncated.content) == (200, b"1")  # "10" cut in half
            with pytest.raises(httpx.RemoteProtocolError):  # headers promise 2 bytes, 1 arrives, then the close
                await client.post("/", content=b"1234567890")
            assert (await client.post("/", content=b"12345678")).text == "8"


async def test_servers_sharing_a_port_with_reuse_port_both_take_connections():
    def named(name):
        async def app(scope, receive, send):
            await read_body(receive)
            await send_reply(send, 200, name, b"text/plain")
        return app

    limits = ServerLimits(reuse_port=True)
    async with HTTPServer(named(b"first"), limits=limits) as first:
        async with HTTPServer(named(b"second"), port=first.port, limits=limits) as second:
            assert second.port == first.port
            answers = set()
            for _ in range(64):  # the kernel spreads new connections by their address hash
                async with httpx.AsyncClient(base_url=first.url) as client:
                    answers.add((await client.post("/", content=b"x")).content)
            assert answers == {b"first", b"second"}
        with pytest.raises(OSError):  # without the option the port stays taken
            await HTTPServer(named(b"third"), port=first.port).start()


SERVE_AND_REPORT_COLLECTOR = """
import gc, os, signal, sys
from miles_envs.serving import HTTPServer, run_forever

async def app(scope, receive, send):
    pass

def ready(server):
    print("serving", gc.get_freeze_count() > 0, gc.get_threshold()[0], flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

before = gc.get_threshold()
run_forever(HTTPServer(app), ready)
print("stopped", gc.get_freeze_count(), gc.get_threshold() == before, flush=True)
"""


def test_a_serving_process_keeps_its_startup_heap_out_of_the_collector_and_restores_it_on_exit():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SERVE_AND_REPORT_COLLECTOR], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    serving, stopped = out.stdout.split("\n")[:2]
    assert serving == "serving True 10000"  # frozen startup heap, young passes an order of magnitude rarer
    assert stopped == "stopped 0 True"
