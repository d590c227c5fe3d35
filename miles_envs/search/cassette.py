"""Record/replay of HTTP exchanges as an httpx transport, so web-search evaluations are reproducible.

A cassette is a JSON file of request → response pairs. Requests match on method, URL and body;
request headers (where API keys live) are never stored. In ``replay`` mode no network transport
exists at all and a request that was not recorded fails with :class:`CassetteMiss`; in ``record``
mode recorded requests are still answered from the cassette and only new ones go out.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Literal

import httpx

CASSETTE_VERSION = 1
CassetteMode = Literal["replay", "record"]


class CassetteMiss(LookupError):
    """Replay mode met a request the cassette does not hold."""


def _key(request: httpx.Request) -> str:
    return json.dumps([request.method, str(request.url), request.content.decode("utf-8", "replace")])


class Cassette:
    def __init__(self, path: str | Path, mode: CassetteMode = "replay") -> None:
        if mode not in ("replay", "record"):
            raise ValueError(f"cassette mode must be 'replay' or 'record', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.interactions: list[dict[str, Any]] = []
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("version") != CASSETTE_VERSION:
                raise ValueError(f"{self.path}: cassette version {data.get('version')!r}, expected {CASSETTE_VERSION}")
            self.interactions = data["interactions"]
        elif mode == "replay":
            raise FileNotFoundError(f"no cassette at {self.path}; record one first with mode='record'")
        self._index = {_stored_key(item["request"]): item["response"] for item in self.interactions}

    def lookup(self, request: httpx.Request) -> httpx.Response | None:
        stored = self._index.get(_key(request))
        if stored is None:
            return None
        body = base64.b64decode(stored["body_base64"]) if "body_base64" in stored else stored["body"].encode()
        return httpx.Response(stored["status_code"], headers=stored["headers"], content=body, request=request)

    def add(self, request: httpx.Request, response: httpx.Response) -> None:
        """Store an exchange (``response`` must be read) and rewrite the file atomically."""
        stored: dict[str, Any] = {
            "status_code": response.status_code,
            "headers": {"content-type": response.headers.get("content-type", "application/octet-stream")},
        }
        try:
            stored["body"] = response.content.decode("utf-8")
        except UnicodeDecodeError:
            stored["body_base64"] = base64.b64encode(response.content).decode()
        entry = {
            "request": {
                "method": request.method,
                "url": str(request.url),
                "body": request.content.decode("utf-8", "replace"),
            },
            "response": stored,
        }
        self.interactions.append(entry)
        self._index[_key(request)] = stored
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(json.dumps({"version": CASSETTE_VERSION, "interactions": self.interactions}, indent=1) + "\n")
        os.replace(temporary, self.path)


def _stored_key(request: dict[str, Any]) -> str:
    return json.dumps([request["method"], request["url"], request["body"]])


class CassetteTransport(httpx.AsyncBaseTransport):
    """Answers from the cassette; in record mode sends misses over the network and records them."""

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        self._network: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        recorded = self.cassette.lookup(request)
        if recorded is not None:
            return recorded
        if self.cassette.mode != "record":
            raise CassetteMiss(
                f"{self.cassette.path} has no recorded response for {request.method} {request.url} "
                f"with body {request.content[:200]!r}; record it with mode='record'"
            )
        self._network = self._network or httpx.AsyncHTTPTransport()
        response = await self._network.handle_async_request(request)
        await response.aread()
        self.cassette.add(request, response)
        return self.cassette.lookup(request)

    async def aclose(self) -> None:
        if self._network is not None:
            await self._network.aclose()
            self._network = None
