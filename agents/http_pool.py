"""A lean HTTP/1.1 connection pool for many concurrent JSON requests to one server.

Why not httpx/aiohttp: at 10⁴ concurrent episodes the client's CPU per request is the rollout's
limit, and general clients spend most of it on features an RL client never uses (URL objects,
cookie jars, header multidicts, middleware, pool rescans). Measured side by side in
``bench/client_overhead.py``. Here a request is one preformatted ``bytes`` write on a kept-alive
socket and the response is parsed by ``httptools`` (llhttp, the parser uvicorn and Node use) inside
an ``asyncio.Protocol``: no stream objects, no per-request tasks.

Connections are reused LIFO (light load keeps hitting warm sockets), idle ones are dropped before
the server's keep-alive timeout would close them under us, and at most ``max_connections`` are
open: further requests wait for one to come back.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_heap_tuned = False


def keep_freed_heap(mmap_threshold: int = 8 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let glibc reuse freed heap memory for large buffers instead of mapping fresh pages (glibc only).

    A routed response is a ~200 KB buffer, and each read allocates a 256 KB one. glibc serves such
    sizes with a fresh ``mmap`` (or gives the heap's top back after them), so every request page-faults
    and zeroes some fifty pages: a third of a routed request's client CPU (measured in
    ``bench/client_overhead.py``). Raising the two thresholds keeps up to ``trim_threshold`` bytes of
    freed heap in the process. Process-wide; called once by the first ``ConnectionPool``; returns
    whether the allocator took the setting.
    """
    global _heap_tuned
    if _heap_tuned or not sys.platform.startswith("linux"):
        return _heap_tuned
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _heap_tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _heap_tuned


class HTTPError(Exception):
    """Base of the transport failures below; the message names the server."""


class ConnectError(HTTPError):
    """The connection could not be opened (refused, unreachable, connect timeout): nothing was sent."""


class RemoteProtocolError(HTTPError):
    """The connection dropped or broke HTTP after the request was sent: the server may still be running it."""


class ReadTimeout(HTTPError):
    """No complete response within the request's timeout."""


@dataclass
class Response:
    status_code: int
    content: bytes
    content_type: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class _Connection(asyncio.Protocol):
    """One socket; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.chunks: list[bytes] = []
        self.content_type = ""
        self._header_name = b""
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RemoteProtocolError(f"server closed the connection before the response was complete ({exc or 'EOF'})"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        response = Response(self.parser.get_status_code(), body, self.content_type)
        if not self.parser.should_keep_alive():
            self.closed = True
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # requests
    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Response]:
        self.chunks, self.content_type = [], ""
        self.waiter = loop.create_future()
        self.transport.write(data)
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class ConnectionPool:
    """``await pool.request("POST", "/generate", body, timeout=600)`` → ``Response``.

    ``body`` is JSON as bytes or as a list of chunks (joined once, with the request head).
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 1024,
        connect_timeout: float = 10.0,
        idle_timeout: float = 4.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url!r}: only plain http://host:port URLs are supported (put TLS in a proxy)")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout  # below the server's keep-alive (uvicorn's default is 5 s)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {parts.netloc}\r\n{extra}".encode("latin-1")
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._deadlines = _Deadlines()
        keep_freed_heap()

    async def request(self, method: str, path: str, body: bytes | list[bytes] | None = None, *, timeout: float) -> Response:
        data = self._format(method, path, body)
        loop = asyncio.get_running_loop()
        conn = await self._checkout(loop)
        reusable = False
        try:
            waiter = conn.send(data, loop)
            deadline = self._deadlines.add(loop, waiter, timeout)
            try:
                response = await waiter
            finally:
                self._deadlines.discard(deadline, waiter)
            reusable = not conn.closed
            return response
        finally:
            self._checkin(conn, reusable)

    def _format(self, method: str, path: str, body: bytes | list[bytes] | None) -> bytes:
        start = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1")
        if body is None:
            return start + self._head + b"\r\n"
        chunks = [body] if isinstance(body, bytes) else body
        length = sum(map(len, chunks))
        return b"".join((start, self._head, b"Content-Type: application/json\r\nContent-Length: ",
                         str(length).encode(), b"\r\n\r\n", *chunks))

    async def _checkout(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.transport.close()  # stale: the server may close it under us at any moment
            self._open -= 1
        while self._open >= self.max_connections:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await waiter
            if self._idle:
                return await self._checkout(loop)
        self._open += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._open -= 1
            self._wake()
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc or type(exc).__name__}") from exc
        return conn

    def _checkin(self, conn: _Connection, reusable: bool) -> None:
        if reusable and conn.waiter is None:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.transport.close()
            self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.transport.close()
        self._open -= len(idle)


class _Deadlines:
    """Request timeouts grouped in buckets, one timer per bucket instead of one per request.

    With 10⁴ requests in flight the event loop's timer heap (ordered by a Python-level comparison)
    and its cancelled entries cost more than the request itself. A request expires at the end of its
    bucket: never early, at most 2% of its timeout (and 1 s) late.
    """

    def __init__(self) -> None:
        self._buckets: dict[float, dict[asyncio.Future[Response], float]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Response], timeout: float) -> float:
        width = min(1.0, max(0.001, timeout / 50))
        at = math.ceil((loop.time() + timeout) / width) * width
        bucket = self._buckets.get(at)
        if bucket is None:
            bucket = self._buckets[at] = {}
            loop.call_at(at, self._expire, at)
        bucket[waiter] = timeout
        return at

    def discard(self, at: float, waiter: asyncio.Future[Response]) -> None:
        bucket = self._buckets.get(at)
        if bucket is not None:
            bucket.pop(waiter, None)

    def _expire(self, at: float) -> None:
        for waiter, timeout in self._buckets.pop(at, {}).items():
            if not waiter.done():
                waiter.set_exception(ReadTimeout(f"no response within {timeout:g}s"))
