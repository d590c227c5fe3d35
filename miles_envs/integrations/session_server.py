"""``miles-envs serve-session``: an OpenAI-compatible ``/v1/chat/completions`` that records token ids.

Point any harness that speaks OpenAI chat at it. The session is chosen by the URL
(``base_url=http://host:port/sessions/<id>/v1``) or by an ``X-Session-Id`` header on ``/v1``; each
session records its exact token stream (see ``session.ChatSession``), read back with
``GET /sessions/<id>`` and dropped with ``DELETE /sessions/<id>``. Streaming is not offered.
Needs the ``serve`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from miles_envs.agents.engine import Engine, Generation, SamplingParams
from miles_envs.integrations.session import ChatSession, EngineAborted

DEFAULT_SESSION = "default"
DEFAULT_MAX_TOKENS = 1024


def sampling_from_openai(body: dict[str, Any]) -> SamplingParams:
    stop = body.get("stop") or []
    return SamplingParams(
        temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
        top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
        max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS),
        stop=[stop] if isinstance(stop, str) else list(stop),
        seed=body.get("seed"),
    )


def completion_body(session_id: str, model: str, reply: dict[str, Any], gen: Generation) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    if reply.get("tool_calls"):
        message["tool_calls"] = reply["tool_calls"]
    finish = "tool_calls" if reply.get("tool_calls") else ("length" if gen.finish_reason == "length" else "stop")
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": len(gen.output_ids),
            "total_tokens": gen.prompt_tokens + len(gen.output_ids),
        },
        "session_id": session_id,
    }


class SessionStore:
    """Sessions by id, each behind a lock (one request at a time per conversation)."""

    def __init__(self, engine: Engine, renderer: Any, parser: Any) -> None:
        self.engine, self.renderer, self.parser = engine, renderer, parser
        self.sessions: dict[str, ChatSession] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def get(self, session_id: str) -> tuple[ChatSession, asyncio.Lock]:
        if session_id not in self.sessions:
            self.sessions[session_id] = ChatSession(session_id, self.engine, self.renderer, self.parser)
            self.locks[session_id] = asyncio.Lock()
        return self.sessions[session_id], self.locks[session_id]


def create_app(engine_factory: Callable[[], Engine], renderer: Any, parser: Any, *, model: str = "miles-envs"):
    """The FastAPI app; the engine is built on the server's event loop (HTTP clients are loop-bound)."""
    state: dict[str, SessionStore] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = engine_factory()
        state["store"] = SessionStore(engine, renderer, parser)
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="miles-envs session endpoint", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def openai_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Errors in OpenAI's shape, so clients show the message."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": exc.detail, "type": kind}}, status_code=exc.status_code)

    async def chat(session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise HTTPException(400, "stream=true is not supported: request the whole completion")
        if int(body.get("n") or 1) != 1:
            raise HTTPException(400, "n must be 1: one recorded stream per session")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(400, "messages must be a non-empty list of chat messages")
        session, lock = state["store"].get(session_id)
        async with lock:
            try:
                reply, gen = await session.complete(messages, sampling_from_openai(body), tools=body.get("tools"))
            except EngineAborted as exc:
                raise HTTPException(503, f"the engine aborted the request: {exc}") from exc
        return completion_body(session_id, body.get("model") or model, reply, gen)

    @app.post("/v1/chat/completions")
    async def chat_by_header(request: Request) -> dict[str, Any]:
        return await chat(request.headers.get("x-session-id") or DEFAULT_SESSION, await request.json())

    @app.post("/sessions/{session_id}/v1/chat/completions")
    async def chat_by_path(session_id: str, request: Request) -> dict[str, Any]:
        return await chat(session_id, await request.json())

    @app.get("/v1/models")
    @app.get("/sessions/{session_id}/v1/models")
    async def models(session_id: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "miles-envs"}]}

    @app.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": sorted(state["store"].sessions)}

    @app.get("/sessions/{session_id}")
    async def read_session(session_id: str) -> dict[str, Any]:
        store = state["store"]
        if session_id not in store.sessions:
            raise HTTPException(404, f"no session {session_id!r}; GET /sessions lists them")
        return store.sessions[session_id].record()

    @app.delete("/sessions/{session_id}")
    async def drop_session(session_id: str) -> dict[str, Any]:
        store = state["store"]
        if store.sessions.pop(session_id, None) is None:
            raise HTTPException(404, f"no session {session_id!r}")
        store.locks.pop(session_id, None)
        return {"deleted": session_id}

    return app
