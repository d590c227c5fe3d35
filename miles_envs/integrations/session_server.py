"""``miles-envs serve-session``: an OpenAI-compatible ``/v1/chat/completions`` that records token ids.

Point any harness that speaks OpenAI chat at it. The session is chosen by the URL
(``base_url=http://host:port/sessions/<id>/v1``) or by an ``X-Session-Id`` header on ``/v1``; each
session records its exact token stream (see ``session.ChatSession``), read back with
``GET /sessions/<id>`` and dropped with ``DELETE /sessions/<id>``. Streaming is not offered.
A starlette app for the project's server stack (``miles_envs.serving``); needs the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from miles_envs.engine import Engine, Generation, SamplingParams
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


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def create_app(engine_factory: Callable[[], Engine], renderer: Any, parser: Any, *, model: str = "miles-envs") -> Starlette:
    """The ASGI app; the engine is built on the server's event loop (HTTP clients are loop-bound)."""
    state: dict[str, SessionStore] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette):
        engine = engine_factory()
        state["store"] = SessionStore(engine, renderer, parser)
        try:
            yield
        finally:
            await engine.close()

    async def openai_error(request: Request, exc: HTTPException) -> Response:
        """Errors in OpenAI's shape, so clients show the message."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json({"error": {"message": exc.detail, "type": kind}}, exc.status_code)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise HTTPException(400, f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return body

    async def chat(session_id: str, body: dict[str, Any]) -> Response:
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
        return _json(completion_body(session_id, body.get("model") or model, reply, gen))

    async def chat_by_header(request: Request) -> Response:
        return await chat(request.headers.get("x-session-id") or DEFAULT_SESSION, await body_of(request))

    async def chat_by_path(request: Request) -> Response:
        return await chat(request.path_params["session_id"], await body_of(request))

    async def models(request: Request) -> Response:
        return _json({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "miles-envs"}]})

    async def list_sessions(request: Request) -> Response:
        return _json({"sessions": sorted(state["store"].sessions)})

    async def read_session(request: Request) -> Response:
        session_id, store = request.path_params["session_id"], state["store"]
        if session_id not in store.sessions:
            raise HTTPException(404, f"no session {session_id!r}; GET /sessions lists them")
        return _json(store.sessions[session_id].record())

    async def drop_session(request: Request) -> Response:
        session_id, store = request.path_params["session_id"], state["store"]
        if store.sessions.pop(session_id, None) is None:
            raise HTTPException(404, f"no session {session_id!r}")
        store.locks.pop(session_id, None)
        return _json({"deleted": session_id})

    routes = [
        Route("/v1/chat/completions", chat_by_header, methods=["POST"]),
        Route("/sessions/{session_id}/v1/chat/completions", chat_by_path, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/sessions/{session_id}/v1/models", models, methods=["GET"]),
        Route("/sessions", list_sessions, methods=["GET"]),
        Route("/sessions/{session_id}", read_session, methods=["GET"]),
        Route("/sessions/{session_id}", drop_session, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: openai_error})
