"""The one HTTP server stack behind every server the project runs (SGLang protocol, sessions, retrieval).

uvicorn (httptools parser, uvloop in a private loop) serves an ASGI app wrapped in layers that every
server shares: a request-size limit (413 and the connection closed), and optional fault injection
for tests. ``HTTPServer`` owns the lifecycle: bind (``port=0`` picks a free port), keep-alive idle
timeout, graceful shutdown, in the caller's event loop or in a private thread. Needs the ``serve``
extra (starlette, uvicorn, httptools, uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import orjson
import uvicorn

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

S = TypeVar("S", bound="Service")
_HTTP = "httptools" if importlib.util.find_spec("httptools") else "h11"
_UVLOOP = importlib.util.find_spec("uvloop") is not None


@dataclass(frozen=True)
class ServerLimits:
    """Per-server limits; the defaults suit an RL rollout server on a private network."""

    max_body_bytes: int = 64 * 2**20  # a 128k-token prompt as JSON is ~1 MB; this leaves room for batches
    keep_alive_s: float = 75.0  # idle keep-alive connections are closed after this (clients pool longer-lived ones)
    graceful_shutdown_s: float = 10.0  # running requests get this long to finish on stop
    backlog: int = 4096
    # several processes may serve one port (SO_REUSEPORT, Linux): the kernel spreads new connections among them
    reuse_port: bool = False


# ----------------------------------------------------------------------------- replies


def json_body(payload: Any) -> bytes:
    return orjson.dumps(payload)


async def send_reply(send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                     content_type: bytes = b"application/json", close: bool = False) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Callable[[], Awaitable[dict]]) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


# ----------------------------------------------------------------------------- layers


class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413 and close the connection.

    The declared ``content-length`` is checked before reading; a chunked body is counted as it
    arrives. Downstream layers receive the whole body in one message.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and int(value) > self.max_bytes:
                return await self._too_large(send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
        whole = {"type": "http.request", "body": chunks[0] if len(chunks) == 1 else b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()  # only a disconnect can follow
            delivered = True
            return whole

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable) -> None:
        message = f"request body exceeds the server's limit of {self.max_bytes} bytes"
        await send_reply(send, 413, json_body({"error": {"message": message}}), close=True)


FaultKind = Literal["status", "delay", "disconnect", "malformed_json"]


@dataclass(frozen=True)
class Fault:
    """One injected failure of a request."""

    kind: FaultKind
    status: int = 503
    delay_s: float = 0.0

    @classmethod
    def server_error(cls, status: int = 503) -> Fault:
        return cls("status", status=status)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", delay_s=seconds)

    @classmethod
    def disconnect(cls) -> Fault:
        """Send the headers and half the body, then close the connection."""
        return cls("disconnect")

    @classmethod
    def malformed_json(cls) -> Fault:
        """A complete 200 response whose body is truncated JSON."""
        return cls("malformed_json")


class _IncompleteResponseIsIntended(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


DELAY_KEY = "miles_envs.fault_delay_s"


class FaultLayer:
    """Apply queued faults to requests whose path is in ``paths``, one fault per request in arrival order.

    With ``delay_in_app`` a delay is handed to the app as ``scope[DELAY_KEY]`` instead of slept here,
    so the app can make it part of the request's own (abortable) work.
    """

    def __init__(self, app: ASGIApp, paths: frozenset[str], *, delay_in_app: bool = False) -> None:
        self.app, self.paths, self.delay_in_app = app, paths, delay_in_app
        self.faults: deque[Fault] = deque()
        logging.getLogger("uvicorn.error").addFilter(_IncompleteResponseIsIntended())

    def inject(self, fault: Fault, times: int = 1) -> None:
        self.faults.extend([fault] * times)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not self.faults or scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        fault = self.faults.popleft()
        if fault.kind == "status":
            await read_body(receive)
            return await send_reply(send, fault.status, json_body({"error": {"message": f"injected server error {fault.status}"}}))
        if fault.kind == "delay":
            if self.delay_in_app:
                return await self.app({**scope, DELAY_KEY: fault.delay_s}, receive, send)
            await asyncio.sleep(fault.delay_s)
            return await self.app(scope, receive, send)
        start: dict = {}
        parts: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                parts.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(parts)
        half = body[: len(body) // 2]
        if fault.kind == "malformed_json":
            return await send_reply(send, start["status"], half)
        await send(start)  # disconnect: the declared length is the whole body, half is sent, then the socket closes
        await send({"type": "http.response.body", "body": half, "more_body": True})


# ----------------------------------------------------------------------------- lifecycle


class HTTPServer:
    """uvicorn serving ``app`` on ``host:port``: ``async with HTTPServer(app) as s: s.url``, or ``running_in_thread()``."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits = ServerLimits(), lifespan: bool = False) -> None:
        self.app = BodyLimit(app, limits.max_body_bytes)
        self.host, self.port, self.limits = host, port, limits
        self.lifespan = lifespan
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None
        self._thread_context: contextlib.AbstractContextManager | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def server_address(self) -> tuple[str, int]:
        return self.host, self.port

    async def start(self) -> HTTPServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server takes its port back at once
        if self.limits.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.host, self.port))
        sock.listen(self.limits.backlog)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, http=_HTTP, lifespan="on" if self.lifespan else "off", log_level="warning",
            access_log=False, timeout_keep_alive=self.limits.keep_alive_s,
            timeout_graceful_shutdown=self.limits.graceful_shutdown_s, backlog=self.limits.backlog,
            # per-request work no client of these servers reads: X-Forwarded-* rewriting, Server header
            proxy_headers=False, server_header=False,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server, self._socket = server, sock
        self._main = asyncio.create_task(server.main_loop())  # ticks the Date header, watches should_exit
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._main is not None:
            await self._main
        await server.shutdown(sockets=[self._socket])

    async def __aenter__(self) -> HTTPServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def running_in_thread(self) -> contextlib.AbstractContextManager[HTTPServer]:
        return in_thread(self)

    def start_in_thread(self) -> HTTPServer:
        """Like ``running_in_thread`` but returns at once; ``shutdown()`` stops it."""
        self._thread_context = self.running_in_thread()
        self._thread_context.__enter__()
        return self

    def shutdown(self) -> None:
        """Stop a server started with ``start_in_thread``."""
        context, self._thread_context = self._thread_context, None
        if context is not None:
            context.__exit__(None, None, None)


class Service(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


@contextlib.contextmanager
def in_thread(service: S) -> Iterator[S]:
    """Run ``service`` from a private event loop (uvloop when installed) in a daemon thread."""
    loop = _new_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"{type(service).__name__}-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(service.start(), loop).result()
        yield service
    finally:
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    if _UVLOOP:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_forever(service: S, on_ready: Callable[[S], None], on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve in this process until SIGINT/SIGTERM, then shut down gracefully (for CLIs and subprocesses).

    While serving, the heap built at startup (tokenizer, templates, modules) is frozen out of the
    cyclic collector and young collections run less often (``pacing.QuietCollector``): with
    thousands of open connections the default thresholds spent a third of a scripted server's CPU
    in collections (measured in ``bench/loop_overhead.py``'s concurrent part).
    ``on_stop`` runs in the serving loop after the server stopped (release what the app held).
    """
    import signal

    from miles_envs.pacing import quiet_collector

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        try:
            with quiet_collector:
                on_ready(service)
                await stop.wait()
        finally:
            await service.stop()
            if on_stop is not None:
                await on_stop()

    loop = _new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
