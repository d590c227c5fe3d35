"""A real HTTP server on loopback that speaks SGLang's native API in front of any ``Engine``.

It lets the SGLang client, the env loop and the CLI run against the exact wire format without a
GPU: ``POST /generate`` (token ids in, ``meta_info`` out, routed experts as base64 int32 from
``routed_experts_start_len``) plus the admin endpoints an RL loop uses. It runs on the project's
server stack (``miles_envs.serving``: uvicorn, request-size limit, keep-alive timeout, graceful
shutdown); faults can be injected per ``/generate`` request (5xx, delay, disconnect mid-body,
malformed JSON) and a fixed latency added to every generation. Behind a ``ThroughputModel`` engine it
behaves like a GPU server (slots, batch-dependent decode time, weight updates that pause admission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import uuid
from collections import deque
from typing import Any

import orjson

from miles_envs.engine import Engine, Generation
from miles_envs.agents.sglang_wire import generate_response, sampling_from_request
from miles_envs.serving import DELAY_KEY, Fault, FaultLayer, HTTPServer, ServerLimits, in_thread, json_body, read_body, send_reply

__all__ = ["Fault", "ProtocolServer", "ServerProcess", "main"]

_Reply = tuple[int, bytes, bytes]  # status, body, content type
_JSON, _TEXT = b"application/json", b"text/plain"


def _json_reply(status: int, payload: Any) -> _Reply:
    return status, json_body(payload), _JSON


def _error(status: int, message: str) -> _Reply:
    return _json_reply(status, {"error": {"message": message}})


def _text(status: int, text: str = "") -> _Reply:
    return status, text.encode(), _TEXT


class _BadRequest(Exception):
    pass


class ProtocolServer:
    """SGLang-protocol HTTP server; use ``async with ProtocolServer(engine) as server: server.url``."""

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        context_length: int = 32768,
        latency_s: float = 0.0,
        model_path: str = "scripted",
        weight_version: str = "default",
        routing_shape: tuple[int, int] | None = None,
        limits: ServerLimits = ServerLimits(),
        keep_requests: int = 256,
    ) -> None:
        self.engine = engine
        self.context_length = context_length
        self.latency_s = latency_s
        self.model_path = model_path
        self.weight_version = weight_version
        self.routing_shape = routing_shape
        self._bodies: deque[bytes] = deque(maxlen=keep_requests)
        self.lora_adapters: dict[str, str] = {}
        self._in_flight: dict[str, asyncio.Task[Generation]] = {}
        self._in_engine: set[str] = set()  # rids past the server's own latency/pause, now inside the engine
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._routes = self._route_table()
        self._faults = FaultLayer(self._app, frozenset({"/generate"}), delay_in_app=True)
        self._http = HTTPServer(self._record, host=host, port=port, limits=limits)

    # ------------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The last ``keep_requests`` ``/generate`` bodies received (faulted ones included), oldest first."""
        decoded = []
        for body in self._bodies:
            with contextlib.suppress(orjson.JSONDecodeError):
                decoded.append(orjson.loads(body))
        return decoded

    async def start(self) -> ProtocolServer:
        self._resumed = asyncio.Event()  # bind to the running loop
        self._resumed.set()
        await self._http.start()
        return self

    async def stop(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        await self._http.stop()

    async def __aenter__(self) -> ProtocolServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def running_in_thread(self) -> contextlib.AbstractContextManager[ProtocolServer]:
        """Serve from a private event loop in a daemon thread (for synchronous callers and CLIs)."""
        return in_thread(self)

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` ``/generate`` requests (in arrival order)."""
        self._faults.inject(fault, times)

    @property
    def pending_faults(self) -> int:
        return len(self._faults.faults)

    # ------------------------------------------------------------------ ASGI

    async def _record(self, scope: dict, receive: Any, send: Any) -> None:
        """Keep ``/generate`` bodies (before any fault) so tests can count and inspect what arrived."""
        if scope["type"] != "http" or scope["path"] != "/generate":
            return await self._faults(scope, receive, send)
        body = await read_body(receive)
        self._bodies.append(body)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        await self._faults(scope, replay, send)

    async def _app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return None
        body = await read_body(receive)
        status, body, content_type = await self._dispatch(scope["method"], scope["path"], body, scope.get(DELAY_KEY, 0.0))
        await send_reply(send, status, body, content_type)

    async def _dispatch(self, method: str, path: str, body: bytes, fault_delay_s: float) -> _Reply:
        route = self._routes.get(path)
        if route is None:
            return _json_reply(404, {"detail": "Not Found"})
        methods, handler = route
        if method not in methods:
            return _json_reply(405, {"detail": "Method Not Allowed"})
        try:
            payload = orjson.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise _BadRequest("the request body must be a JSON object")
            return await (self._generate(payload, fault_delay_s) if path == "/generate" else handler(payload))
        except orjson.JSONDecodeError as exc:
            return _error(400, f"invalid JSON body: {exc}")
        except _BadRequest as exc:
            return _error(400, str(exc))

    def _route_table(self) -> dict[str, tuple[tuple[str, ...], Any]]:
        get, post, both = ("GET",), ("POST", "PUT"), ("GET", "POST")
        return {
            "/generate": (post, self._generate),
            "/health": (get, self._health),
            "/health_generate": (get, self._health_generate),
            "/get_server_info": (get, self._server_info),
            "/get_model_info": (get, self._model_info),
            "/v1/models": (get, self._models),
            "/flush_cache": (both, self._flush_cache),
            "/abort_request": (("POST",), self._abort_request),
            "/update_weights_from_disk": (("POST",), self._update_weights_from_disk),
            "/load_lora_adapter": (("POST",), self._load_lora_adapter),
            "/unload_lora_adapter": (("POST",), self._unload_lora_adapter),
            "/pause_generation": (("POST",), self._pause_generation),
            "/continue_generation": (("POST",), self._continue_generation),
        }

    # ------------------------------------------------------------------ /generate

    async def _generate(self, payload: dict[str, Any], fault_delay_s: float = 0.0) -> _Reply:
        input_ids = self._validated_input_ids(payload)
        sampling = sampling_from_request(payload.get("sampling_params") or {})
        if len(input_ids) + sampling.max_new_tokens > self.context_length:
            raise _BadRequest(
                f"Requested token count exceeds the model's maximum context length of {self.context_length} "
                f"tokens. You requested a total of {len(input_ids) + sampling.max_new_tokens} tokens: "
                f"{len(input_ids)} tokens from the input messages and {sampling.max_new_tokens} tokens for the "
                f"completion. Please reduce the number of tokens in the input messages or the completion to fit "
                f"within the limit."
            )
        return_routed = bool(payload.get("return_routed_experts", False))
        start = int(payload.get("routed_experts_start_len", 0) or 0)
        if not 0 <= start <= len(input_ids):
            raise _BadRequest(f"routed_experts_start_len={start} must be in [0, {len(input_ids)}]")
        lora = payload.get("lora_path")
        if lora is not None and lora not in self.lora_adapters:
            raise _BadRequest(f"LoRA adapter {lora!r} is not loaded; loaded: {sorted(self.lora_adapters)}")
        rid = str(payload.get("rid") or uuid.uuid4().hex)
        if rid in self._in_flight:
            raise _BadRequest(f"Duplicate request ID {rid!r}")
        delay = self.latency_s + fault_delay_s

        async def run() -> Generation:
            if delay:
                await asyncio.sleep(delay)
            await self._resumed.wait()
            self._in_engine.add(rid)
            return await self.engine.generate(
                input_ids,
                sampling,
                return_routed_experts=return_routed,
                routed_experts_start=start,
                lora=lora,
                rid=rid,
            )

        task = asyncio.ensure_future(run())
        self._in_flight[rid] = task
        try:
            await asyncio.shield(task)  # /abort_request cancels the task; the handler stays to reply
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the handler itself was cancelled (the server is stopping)
        finally:
            self._in_flight.pop(rid, None)
            self._in_engine.discard(rid)
        if task.cancelled():
            generation = Generation([], [], "abort", error="Aborted by /abort_request")
        elif task.exception() is not None:
            return _error(500, f"engine failed: {task.exception()!r}")
        else:
            generation = task.result()
        body = generate_response(
            generation,
            rid=rid,
            prompt_tokens=len(input_ids),
            weight_version=self.weight_version,
            return_routed_experts=return_routed,
        )
        return _json_reply(200, body)

    @staticmethod
    def _validated_input_ids(payload: dict[str, Any]) -> list[int]:
        input_ids = payload.get("input_ids")
        if input_ids is None:
            raise _BadRequest("this server takes token ids only: send input_ids (text prompts are not supported)")
        if not isinstance(input_ids, list) or not input_ids or not set(map(type, input_ids)) <= {int}:  # C speed on long prompts
            raise _BadRequest("input_ids must be a non-empty list of integers (batched requests are not supported)")
        return input_ids

    # ------------------------------------------------------------------ admin endpoints

    async def _health(self, payload: dict[str, Any]) -> _Reply:
        return _text(200)

    async def _health_generate(self, payload: dict[str, Any]) -> _Reply:
        return _text(200 if await self.engine.health() else 503)

    async def _server_info(self, payload: dict[str, Any]) -> _Reply:
        info: dict[str, Any] = {
            "model_path": self.model_path,
            "context_length": self.context_length,
            "max_req_input_len": self.context_length - 1,
            "weight_version": self.weight_version,
            "lora_paths": dict(self.lora_adapters),
            "internal_states": [{"num_in_flight": len(self._in_flight)}],
            "version": "miles-envs-protocol-server",
        }
        if self.routing_shape is not None:
            info["num_hidden_layers"], info["num_experts_per_tok"] = self.routing_shape
        capacity = getattr(self.engine, "capacity", None)
        if capacity is not None and (slots := await capacity()) is not None:
            info["max_running_requests"] = slots
        return _json_reply(200, info)

    async def _model_info(self, payload: dict[str, Any]) -> _Reply:
        return _json_reply(
            200,
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "weight_version": self.weight_version,
            },
        )

    async def _models(self, payload: dict[str, Any]) -> _Reply:
        card = {"id": self.model_path, "object": "model", "root": self.model_path, "max_model_len": self.context_length}
        return _json_reply(200, {"object": "list", "data": [card]})

    async def _flush_cache(self, payload: dict[str, Any]) -> _Reply:
        if self._in_flight:
            return _text(400, "Cache not flushed: requests are running.\n")
        return _text(200, "Cache flushed.\n")

    async def _abort_request(self, payload: dict[str, Any]) -> _Reply:
        rid = payload.get("rid")
        if payload.get("abort_all"):
            targets = list(self._in_flight)
        else:
            targets = [rid] if rid in self._in_flight else []
        for target in targets:
            if target in self._in_engine:
                await self.engine.abort(target)  # the engine returns what it sampled so far
            else:
                self._in_flight[target].cancel()  # nothing sampled yet
        return _text(200)

    async def _update_weights_from_disk(self, payload: dict[str, Any]) -> _Reply:
        model_path = payload.get("model_path")
        if not model_path:
            raise _BadRequest("model_path is required")
        version = payload.get("weight_version")
        if payload.get("abort_all_requests"):
            await self._abort_request({"abort_all": True})
        try:
            await self.engine.update_weights(model_path, version=version)
        except Exception as exc:  # the engine's own failure is reported, as SGLang does
            return _json_reply(400, {"success": False, "message": f"Failed to update weights: {exc}", "num_paused_requests": 0})
        self.model_path = model_path
        message = "Succeeded to update model weights."
        if version is not None:
            self.weight_version = str(version)
            message += f" Weight version updated to {version}."
        return _json_reply(200, {"success": True, "message": message, "num_paused_requests": 0})

    async def _load_lora_adapter(self, payload: dict[str, Any]) -> _Reply:
        name, path = payload.get("lora_name"), payload.get("lora_path")
        if not name or not path:
            raise _BadRequest("lora_name and lora_path are required")
        if name in self.lora_adapters:
            return _json_reply(400, {"success": False, "error_message": f"LoRA adapter {name!r} is already loaded"})
        self.lora_adapters[name] = path
        return _json_reply(200, {"success": True, "error_message": "", "loaded_adapters": dict(self.lora_adapters)})

    async def _unload_lora_adapter(self, payload: dict[str, Any]) -> _Reply:
        name = payload.get("lora_name")
        if name not in self.lora_adapters:
            return _json_reply(400, {"success": False, "error_message": f"LoRA adapter {name!r} is not loaded"})
        del self.lora_adapters[name]
        return _json_reply(200, {"success": True, "error_message": "", "loaded_adapters": dict(self.lora_adapters)})

    async def _pause_generation(self, payload: dict[str, Any]) -> _Reply:
        mode = payload.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise _BadRequest(f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place'].")
        self._resumed.clear()
        if mode == "abort":
            await self._abort_request({"abort_all": True})
        return _json_reply(200, {"message": "Generation paused successfully.", "status": "ok"})

    async def _continue_generation(self, payload: dict[str, Any]) -> _Reply:
        self._resumed.set()
        return _json_reply(200, {"message": "Generation continued successfully.", "status": "ok"})


# ---------------------------------------------------------------------------- standalone process


def main(argv: list[str] | None = None) -> None:
    """``python -m miles_envs.agents.protocol_server``: a scripted engine behind the protocol.

    With ``--slots`` the engine is paced by a ``ThroughputModel`` (a GPU-like server). SIGTERM or
    Ctrl-C shut it down gracefully; SIGKILL is what a crash looks like.
    """
    from miles_envs.agents.scripted import ScriptedEngine
    from miles_envs.agents.throughput_model import ThroughputModel
    from miles_envs.serving import run_forever
    from miles_envs.tokenizers import load_tokenizer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokenizer", default="qwen3", help="known short name or a tokenizer directory")
    parser.add_argument("--reply", action="append", help="scripted reply text (repeat for several; the n-th observation gets the n-th)")
    parser.add_argument("--reply-by-turn", action="store_true",
                        help="choose the reply by how many tool responses the prompt holds (deterministic under retries)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--context-length", type=int, default=32768)
    parser.add_argument("--weight-version", default="0")
    parser.add_argument("--slots", type=int, default=0, help="pace like a GPU server with this many concurrent sequences")
    parser.add_argument("--decode-ms", type=float, default=10.0, help="decode step time with one sequence running")
    parser.add_argument("--decode-ms-per-running", type=float, default=0.1, help="added step time per running sequence")
    parser.add_argument("--prefill-us-per-token", type=float, default=2.0)
    parser.add_argument("--update-pause-ms", type=float, default=500.0, help="admission pause of a weight update")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    replies = args.reply or ["Done."]
    if args.reply_by_turn:
        marker = tokenizer.convert_tokens_to_ids("<tool_response>")
        chosen = list(replies)
        replies = lambda context: chosen[min(context.input_ids.count(marker), len(chosen) - 1)]  # noqa: E731
    engine: Engine = ScriptedEngine(tokenizer, replies, weight_version=args.weight_version)
    if args.slots:
        engine = ThroughputModel(
            engine, slots=args.slots, decode_s=args.decode_ms / 1e3, decode_s_per_running=args.decode_ms_per_running / 1e3,
            prefill_s_per_token=args.prefill_us_per_token / 1e6, update_pause_s=args.update_pause_ms / 1e3,
            weight_version=args.weight_version,
        )
    server = ProtocolServer(
        engine, host=args.host, port=args.port, latency_s=args.latency_ms / 1000.0,
        context_length=args.context_length, weight_version=args.weight_version,
    )
    run_forever(server, lambda s: print(f"listening on {s.url}", flush=True))


class ServerProcess:
    """The protocol server as a child process on a fixed port, for crash and restart tests.

    ``start()`` returns the URL (the first start may use port 0; restarts reuse the port it got),
    ``kill()`` sends SIGKILL to the process id, ``stop()`` SIGTERM (graceful).
    """

    def __init__(self, args: list[str], *, port: int = 0, startup_timeout_s: float = 60.0) -> None:
        self.args, self.port, self.startup_timeout_s = list(args), port, startup_timeout_s
        self.process: Any = None

    def start(self) -> str:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the server process {self.process.pid} is still running")
        command = [sys.executable, "-m", "miles_envs.agents.protocol_server", "--port", str(self.port), *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = _read_line(self.process.stdout, self.startup_timeout_s)
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"the protocol server did not start: {line!r}")
        url = line.split()[-1]
        self.port = int(url.rsplit(":", 1)[1])
        return url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(stream: Any, timeout_s: float) -> str:
    """One line from a child's stdout, or '' when it stays silent past the timeout."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return stream.readline().strip()


if __name__ == "__main__":
    main()
