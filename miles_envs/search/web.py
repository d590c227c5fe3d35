"""Web search through the Tavily API, optionally behind a record/replay cassette.

With ``cassette=...`` and ``mode="replay"`` (the default when a cassette is given) no request leaves
the process, so an evaluation over recorded searches is deterministic and needs neither network
nor API key. Record a cassette once with ``mode="record"`` and ``TAVILY_API_KEY`` set.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from miles_envs.search.cassette import Cassette, CassetteMode, CassetteTransport
from miles_envs.search.clients import LoopLocalClient
from miles_envs.search.documents import Document

TAVILY_URL = "https://api.tavily.com"
API_KEY_VARIABLE = "TAVILY_API_KEY"
BASE_URL_VARIABLE = "TAVILY_BASE_URL"  # a proxy or a stand-in server


class TavilySearch:
    """``search(queries, k)`` over Tavily's ``POST /search``; one request per query, sent concurrently."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        cassette: str | Path | None = None,
        mode: CassetteMode = "replay",
        base_url: str | None = None,
        search_depth: Literal["basic", "advanced"] = "basic",
        timeout: float = 30.0,
    ) -> None:
        self.search_depth = search_depth
        replaying = cassette is not None and mode == "replay"
        api_key = api_key or os.environ.get(API_KEY_VARIABLE)
        if not api_key and not replaying:
            raise ValueError(f"Tavily needs an API key: set {API_KEY_VARIABLE} or pass api_key= (or replay a cassette)")
        transport = CassetteTransport(Cassette(cassette, mode)) if cassette is not None else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        base_url = base_url or os.environ.get(BASE_URL_VARIABLE, TAVILY_URL)
        self._client = LoopLocalClient(base_url=base_url, headers=headers, transport=transport, timeout=timeout)

    async def search(self, queries: Sequence[str], k: int) -> list[list[Document]]:
        return list(await asyncio.gather(*(self._search_one(query, k) for query in queries)))

    async def _search_one(self, query: str, k: int) -> list[Document]:
        body = {"query": query, "max_results": k, "search_depth": self.search_depth}
        response = await self._client.get().post("/search", json=body)
        response.raise_for_status()
        return [
            Document(hit["url"], hit.get("title", ""), hit.get("content", ""), hit.get("score"))
            for hit in response.json().get("results", [])[:k]
        ]

    async def aclose(self) -> None:
        await self._client.aclose()
