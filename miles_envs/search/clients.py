"""An httpx client per event loop: pooled connections belong to the loop that opened them, and one
env may be driven first through the sync API (its private loop) and later from the caller's loop."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx


class LoopLocalClient:
    def __init__(self, **client_options: Any) -> None:
        self._options = client_options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop, self._client = loop, httpx.AsyncClient(**self._options)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._loop = self._client = None
