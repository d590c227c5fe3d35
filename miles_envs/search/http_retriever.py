"""Search-R1's retrieval API over HTTP: a client for any ``/retrieve`` server, and a server for a local index.

Request: ``POST /retrieve {"queries": [...], "topk": k, "return_scores": true}``. Response:
``{"result": [[{"document": {"id", "contents", ...}, "score": s}, ...], ...]}`` (one list per query;
without scores each entry is the document itself). ``contents`` is ``"title\\ntext"``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from miles_envs.search.clients import LoopLocalClient
from miles_envs.search.documents import Document, document_from_record

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


def serve(query: QueryFn, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Start a ``/retrieve`` server on a daemon thread; ``port=0`` picks a free port (see ``server_address``).

    Stop it with ``server.shutdown()``. Queries are answered one batch at a time (the index is not
    assumed thread-safe; BM25 scoring holds the GIL anyway).
    """
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/retrieve":
                self._reply(404, {"error": f"unknown path {self.path}; POST /retrieve"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    payload = retrieve_response(query, body)
                self._reply(200, payload)
            except (KeyError, TypeError, ValueError) as error:
                self._reply(400, {"error": f"bad /retrieve request: {error}"})

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="retrieve-server", daemon=True).start()
    return server
