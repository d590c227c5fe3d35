"""An httpx client for thousands of concurrent requests to one server.

httpx's connection pool rescans every connection (and every queued request) on each request start
and finish, which is quadratic in the pool size: with thousands of connections the scans cost more
than the requests. So the connections are spread over many small ``httpx.AsyncClient``s, and a
LIFO stack of connection slots admits at most ``per_client`` requests to each. Light load keeps
reusing the first client's warm connections; heavy load opens clients as needed.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from typing import Any

import httpx


class ShardedAsyncClient:
    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        timeout: httpx.Timeout,
        headers: dict[str, str] | None = None,
        per_client: int = 8,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.base_url = base_url
        self.per_client = min(per_client, max_connections)
        self._n_clients = math.ceil(max_connections / self.per_client)
        self._timeout = timeout
        self._headers = headers
        self._ssl = ssl.create_default_context()  # built once, not once per client
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._slots: asyncio.LifoQueue[int] | None = None

    def _slot_stack(self) -> asyncio.LifoQueue[int]:
        if self._slots is None:
            self._slots = asyncio.LifoQueue()
            for shard in reversed(range(self._n_clients)):  # shard 0 ends on top
                for _ in range(self.per_client):
                    self._slots.put_nowait(shard)
        return self._slots

    def _client(self, shard: int) -> httpx.AsyncClient:
        client = self._clients.get(shard)
        if client is None:
            client = self._clients[shard] = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=self._timeout,
                verify=self._ssl,
                limits=httpx.Limits(max_connections=self.per_client, max_keepalive_connections=self.per_client),
            )
        return client

    async def request(self, method: str, path: str, *, json: Any = None, timeout: Any = None) -> httpx.Response:
        """Send one request and read the whole body; waits for a free connection slot first."""
        slots = self._slot_stack()
        shard = await slots.get()
        try:
            extra = {} if timeout is None else {"timeout": timeout}
            return await self._client(shard).request(method, path, json=json, **extra)
        finally:
            slots.put_nowait(shard)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.aclose() for client in clients))
