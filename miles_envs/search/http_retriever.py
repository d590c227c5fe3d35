"""Search-R1's retrieval API over HTTP: a client for any ``/retrieve`` server, and a server for a local index.

Request: ``POST /retrieve {"queries": [...], "topk": k, "return_scores": true}``. Response:
``{"result": [[{"document": {"id", "contents", ...}, "score": s}, ...], ...]}`` (one list per query;
without scores each entry is the document itself). ``contents`` is ``"title\\ntext"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from miles_envs.search.clients import LoopLocalClient
from miles_envs.search.documents import Document, document_from_record

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from miles_envs.serving import HTTPServer

QueryFn = Callable[[Sequence[str], int], list[list[Document]]]


class HTTPRetriever:
    """Client of a Search-R1 ``/retrieve`` server (dense E5/FAISS, BM25, or :func:`serve`)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self._client = LoopLocalClient(timeout=timeout)

    async def search(self, queries: Sequence[str], k: int) -> list[list[Document]]:
        if not queries:
            return []
        response = await self._client.get().post(self.url, json={"queries": list(queries), "topk": k, "return_scores": True})
        response.raise_for_status()
        results = response.json()["result"]
        if len(results) != len(queries):
            raise ValueError(f"{self.url} answered {len(results)} result lists for {len(queries)} queries")
        return [[_document(entry) for entry in per_query] for per_query in results]

    async def aclose(self) -> None:
        await self._client.aclose()


def _document(entry: dict[str, Any]) -> Document:
    if "document" in entry:
        return document_from_record({**entry["document"], "score": entry.get("score")})
    return document_from_record(entry)


def retrieve_response(query: QueryFn, body: dict[str, Any]) -> dict[str, Any]:
    """The ``/retrieve`` response for a request body."""
    queries, k = body["queries"], int(body.get("topk", 3))
    with_scores = bool(body.get("return_scores", False))
    result = []
    for documents in query(queries, k):
        rows = [{"id": doc.id, "title": doc.title, "text": doc.text, "contents": doc.contents} for doc in documents]
        if with_scores:
            rows = [{"document": row, "score": doc.score} for row, doc in zip(rows, documents)]
        result.append(rows)
    return {"result": result}


def retrieve_app(query: QueryFn) -> Starlette:
    """``POST /retrieve`` as an ASGI app. Batches run one at a time off the event loop (the index is
    not assumed thread-safe; BM25 scoring holds the GIL anyway)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    lock = threading.Lock()

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        with lock:
            return retrieve_response(query, body)

    async def retrieve(request: Request) -> Response:
        try:
            payload = await run_in_threadpool(answer, orjson.loads(await request.body()))
        except (KeyError, TypeError, ValueError) as error:  # orjson.JSONDecodeError is a ValueError
            return Response(orjson.dumps({"error": f"bad /retrieve request: {error}"}), 400, media_type="application/json")
        return Response(orjson.dumps(payload), media_type="application/json")

    async def unknown(request: Request) -> Response:
        return Response(orjson.dumps({"error": f"unknown path {request.url.path}; POST /retrieve"}), 404, media_type="application/json")

    return Starlette(routes=[Route("/retrieve", retrieve, methods=["POST"]), Route("/{path:path}", unknown, methods=["GET", "POST"])])


def serve(query: QueryFn, host: str = "127.0.0.1", port: int = 8000) -> HTTPServer:
    """Start a ``/retrieve`` server on a daemon thread; ``port=0`` picks a free port (see ``server_address``).

    Stop it with ``server.shutdown()``. Needs the ``serve`` extra.
    """
    from miles_envs.serving import HTTPServer

    return HTTPServer(retrieve_app(query), host=host, port=port).start_in_thread()
