"""SGLangEngine: a lean client of SGLang's native ``/generate`` API and admin endpoints.

Failure taxonomy (what the env loop sees):
- connect errors, dropped connections and 5xx are retried with exponential backoff (``retries``);
- when those run out the client asks whether the server is gone: if ``/health_generate`` fails it
  waits for it (backoff, up to ``restart_deadline_s``), re-reads ``/get_server_info`` and resubmits
  from the same input ids, so a restarted server costs time, not episodes. The model facts must
  still hold after a restart (same tokenizer, routing shape, a context length no shorter); if not,
  every generation aborts with the reason. Only after the deadline does a call return ``abort``;
- a retry never reuses a ``rid`` the server may still be running: a dropped response is aborted on
  the server and the retry gets a fresh id (``<rid>.retry<n>``); ``abort(rid)`` follows the renames;
- 4xx is never retried (the request itself is wrong): ``abort`` with the server's message;
- a read timeout returns ``abort`` at once and asks the server to abort the request's ``rid``;
- a body that is not valid JSON or breaks the wire invariants returns ``abort`` with the reason.
Admin calls raise ``EngineAdminError`` instead, because they are configuration, not data.

Cost per request (a measured budget, ``bench/client_overhead.py``): the history of an episode's
``TokenIds`` stream is encoded once, each turn adding only its own ids; routing rows are decoded
from the raw body without passing through the JSON parser (``sglang_wire``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from miles_envs.engine import Generation, SamplingParams
from miles_envs.weight_sync import BroadcastGroup, WeightSource, accept
from miles_envs.agents.http_pool import ConnectError, ConnectionPool, HTTPError, ReadTimeout, RemoteProtocolError, Response
from miles_envs.agents.sglang_wire import ProtocolError, encode_generate_request, load_generate_body, parse_generate_response

log = logging.getLogger(__name__)


class EngineAdminError(RuntimeError):
    """An admin endpoint refused or failed (weights, LoRA, cache, server info)."""


class _RequestFailed(Exception):
    """A request that cannot succeed (4xx, retries exhausted, server gone); the message says why."""


class _RequestTimedOut(Exception):
    pass


@dataclass
class _Pending:
    """One caller's generate: the id the server knows it by now, and whether the caller aborted it."""

    wire_rid: str
    aborted: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


_RECOVERED, _UP = "recovered", "up"


class SGLangEngine:
    """``Engine`` backed by an SGLang server (or anything speaking its protocol) at ``base_url``.

    ``context_length`` clamps ``max_new_tokens`` so prompt + completion fits; when omitted it is read
    from ``/get_server_info`` (or ``/v1/models``). ``num_layers``/``topk`` shape the routed experts
    (``num_hidden_layers`` and ``num_experts_per_tok`` of the served model). ``capacity`` overrides the
    server's ``max_running_requests`` for admission. ``max_connections`` bounds open sockets;
    requests beyond it queue in the client (keep it at or below the server's listen backlog).
    """

    def __init__(
        self,
        base_url: str,
        *,
        context_length: int | None = None,
        num_layers: int | None = None,
        topk: int | None = None,
        capacity: int | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        restart_deadline_s: float = 900.0,
        max_connections: int = 1024,
        api_key: str | None = None,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if restart_deadline_s < 0:
            raise ValueError(f"restart_deadline_s must be >= 0, got {restart_deadline_s}")
        self.base_url = base_url.rstrip("/")
        self.context_length = context_length
        self.routing_shape = (num_layers, topk) if num_layers and topk else None
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.restart_deadline_s = restart_deadline_s
        self._capacity = capacity
        self._pool = ConnectionPool(
            self.base_url,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._facts_lock = asyncio.Lock()
        self._server_info: dict[str, Any] | None = None
        self._pending: dict[str, _Pending] = {}
        self._recovery: asyncio.Future[str] | None = None
        self._incompatible: str | None = None  # set when a restarted server serves something else
        self.weight_version: str | None = None  # the newest version this client has seen or set
        self._rid_prefix = f"{uuid.uuid4().hex[:16]}-"  # unique per client; a counter after it (no syscall per request)
        self._rids = itertools.count()

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        input_ids: list[int],
        sampling: SamplingParams,
        *,
        return_routed_experts: bool = False,
        routed_experts_start: int = 0,
        lora: str | None = None,
        rid: str | None = None,
    ) -> Generation:
        rid = rid or f"{self._rid_prefix}{next(self._rids):x}"
        if self._incompatible:
            return _aborted(input_ids, self._incompatible)
        try:
            context_length = await self._resolved_context_length()
            if return_routed_experts:
                await self._resolve_routing_shape()
        except _RequestFailed as exc:
            return _aborted(input_ids, f"cannot read the server's limits: {exc}")
        budget = context_length - len(input_ids)
        if budget <= 0:
            return Generation(
                [], [], "length", prompt_tokens=len(input_ids),
                error=f"the prompt ({len(input_ids)} tokens) fills the context length {context_length}",
            )
        def body(wire_rid: str) -> list[bytes]:
            return encode_generate_request(
                input_ids,
                sampling,
                max_new_tokens=min(sampling.max_new_tokens, budget),
                return_routed_experts=return_routed_experts,
                routed_experts_start=routed_experts_start,
                lora=lora,
                rid=wire_rid,
            )

        pending = self._pending[rid] = _Pending(rid)
        started_under = self.weight_version
        try:
            response = await self._generate_with_recovery(body, pending)
        except _RequestTimedOut:
            await self._abort_quietly(pending.wire_rid)
            return _aborted(input_ids, f"/generate timed out after {self.timeout:g}s (rid {pending.wire_rid} aborted)")
        except _RequestFailed as exc:
            return _aborted(input_ids, str(exc))
        finally:
            self._pending.pop(rid, None)
        try:
            generation = parse_generate_response(
                load_generate_body(response.content),
                prompt_len=len(input_ids),
                routed_experts_start=routed_experts_start if return_routed_experts else None,
                routing_shape=self.routing_shape,
            )
        except ValueError as exc:  # orjson.JSONDecodeError and ProtocolError are both ValueErrors
            kind = "malformed" if isinstance(exc, ProtocolError) else "malformed JSON"
            return _aborted(input_ids, f"{kind} response from /generate: {exc}")
        self._label_versions(generation, started_under)
        return generation

    async def _generate_with_recovery(self, body: Callable[[str], list[bytes]], pending: _Pending) -> Response:
        """POST /generate until a response, a 4xx, the caller's abort, or a server gone past the deadline.

        ``body(rid)`` is the request body sent under ``rid``.
        """
        loop = asyncio.get_running_loop()
        original_rid = pending.wire_rid
        data = body(original_rid)
        attempts, renames, trouble_since = 0, 0, None
        while True:
            if pending.aborted:
                raise _RequestFailed(f"aborted by the caller before the server answered (rid {pending.wire_rid})")
            try:
                response = await self._pool.request("POST", "/generate", data, timeout=self.timeout)
            except ReadTimeout as exc:
                raise _RequestTimedOut(str(exc)) from exc
            except ConnectError as exc:
                error, seen_by_server = f"ConnectError: {exc}", False
            except RemoteProtocolError as exc:
                error, seen_by_server = f"RemoteProtocolError: {exc}", True
                await self._abort_quietly(pending.wire_rid)  # it may still be running there
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500:
                    raise _RequestFailed(f"/generate rejected with HTTP {response.status_code}: {_error_message(response)}")
                error, seen_by_server = f"HTTP {response.status_code}: {_error_message(response)}", True
            if seen_by_server:  # never resend an id the server has seen
                renames += 1
                pending.wire_rid = f"{original_rid}.retry{renames}"
                data = body(pending.wire_rid)
            trouble_since = trouble_since if trouble_since is not None else loop.time()
            attempts += 1
            if attempts <= self.retries:
                await _sleep_unless(pending.wake, min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s))
                continue
            try:
                outcome = await self._await_server(pending, trouble_since)
            except _RequestFailed as exc:
                raise _RequestFailed(f"{exc}; last /generate error: {error}") from None
            if outcome == _UP and not error.startswith("ConnectError"):
                raise _RequestFailed(f"/generate failed after {attempts} attempts; last error: {error}")
            if loop.time() - trouble_since > self.restart_deadline_s:
                raise _RequestFailed(f"/generate kept failing for {self.restart_deadline_s:g}s (restart_deadline_s); last error: {error}")
            attempts = 0  # the server is back (or reachable again): a fresh retry budget

    async def _await_server(self, pending: _Pending, trouble_since: float) -> str:
        """Wait, shared by every failing request, until the server answers ``/health_generate``."""
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.ensure_future(self._recover(trouble_since))
        woken = asyncio.ensure_future(pending.wake.wait())
        try:
            await asyncio.wait({self._recovery, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        if not self._recovery.done():
            raise _RequestFailed(f"aborted by the caller while waiting for the server (rid {pending.wire_rid})")
        return self._recovery.result()  # raises _RequestFailed past the deadline

    async def _recover(self, trouble_since: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = trouble_since + self.restart_deadline_s
        delay, first = self.backoff_s, True
        while not await self._healthy():
            first = False
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _RequestFailed(
                    f"{self.base_url} unreachable for {self.restart_deadline_s:g}s (restart_deadline_s): "
                    "/health_generate never answered 200"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self.max_backoff_s)
        if first:
            return _UP
        log.warning("%s is healthy again; re-reading its server info", self.base_url)
        await self._refresh_facts()
        return _RECOVERED

    async def _healthy(self) -> bool:
        try:
            response = await self._pool.request("GET", "/health_generate", timeout=min(self.timeout, 60.0))
        except HTTPError:
            return False
        return response.status_code == 200

    async def _refresh_facts(self) -> None:
        """Re-read ``/get_server_info`` after a restart; a server now serving something else is refused."""
        old = self._server_info or {}
        try:
            new = orjson.loads((await self._request("GET", "/get_server_info")).content)
        except (_RequestFailed, _RequestTimedOut, ValueError) as exc:
            raise _RequestFailed(f"{self.base_url} came back but /get_server_info failed: {exc}") from exc
        problems = []
        for key in ("served_model_name", "tokenizer_path", "num_hidden_layers", "num_experts_per_tok"):
            if key in old and key in new and old[key] != new[key]:
                problems.append(f"{key} was {old[key]!r}, now {new[key]!r}")
        if self.context_length is not None and new.get("context_length") is not None and int(new["context_length"]) < self.context_length:
            problems.append(f"context_length was {self.context_length}, now {new['context_length']}")
        if problems:
            self._incompatible = (
                f"{self.base_url} restarted with an incompatible model ({'; '.join(problems)}): token ids or routing "
                "from it would not match this rollout; start a new client for the new model"
            )
            log.error(self._incompatible)
            raise _RequestFailed(self._incompatible)
        self._server_info = new
        if new.get("weight_version") is not None:
            self.weight_version = str(new["weight_version"])

    def _label_versions(self, generation: Generation, started_under: str | None) -> None:
        """Per-token versions: the server's spans when it reports them, else the version the request started under."""
        if generation.weight_version is None:
            return
        if not generation.version_spans and started_under is not None and started_under != generation.weight_version:
            generation.version_spans = [(0, started_under)]  # the split point is unknown (see docs/sglang-protocol.md)
        self.weight_version = generation.weight_version

    # ------------------------------------------------------------------ admin

    async def health(self) -> bool:
        try:
            response = await self._pool.request("GET", "/health", timeout=10.0)
        except HTTPError:
            return False
        return response.status_code == 200

    async def server_info(self) -> dict[str, Any]:
        return orjson.loads((await self._admin("GET", "/get_server_info")).content)

    async def capacity(self) -> int | None:
        """Generation requests the server runs at once: the explicit option, else ``max_running_requests``."""
        if self._capacity is not None:
            return self._capacity
        try:
            info = await self._facts()
        except _RequestFailed:
            return None
        states = info.get("internal_states") or [{}]
        value = info.get("max_running_requests") or states[0].get("max_running_requests")
        return int(value) if value else None

    async def flush_cache(self) -> None:
        await self._admin("POST", "/flush_cache")

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request by ``rid`` (its pending ``generate`` returns the partial output), or all when None."""
        if rid is None:
            for pending in self._pending.values():
                pending.aborted = True
                pending.wake.set()
            await self._admin("POST", "/abort_request", {"abort_all": True})
            return
        pending = self._pending.get(rid)
        if pending is not None:
            pending.aborted = True
            pending.wake.set()
        await self._admin("POST", "/abort_request", {"rid": pending.wire_rid if pending else rid})

    weight_sources = frozenset({"folder", "broadcast"})  # a server cannot see the trainer's memory

    async def update_weights(self, source: WeightSource | Any, *, version: str | None = None) -> None:
        """Reload from a ``CheckpointFolder`` the server can read, or take a ``BroadcastGroup``'s tensors.

        For a broadcast the server must have joined the group (``/init_weights_update_group``) and the
        trainer broadcasts the announced tensors while this request waits for the server to load them.
        """
        typed = accept(source, self.weight_sources, "SGLangEngine")
        if isinstance(typed, BroadcastGroup):
            path, body = "/update_weights_from_distributed", typed.to_sglang()
        else:
            path, body = "/update_weights_from_disk", {"model_path": typed.path}
        if version is not None:
            body["weight_version"] = version
        await self._admin("POST", path, body)
        if version is not None:
            self.weight_version = version

    async def load_lora_adapter(self, name: str, path: str, *, pinned: bool = False) -> None:
        await self._admin("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": pinned})

    async def unload_lora_adapter(self, name: str) -> None:
        await self._admin("POST", "/unload_lora_adapter", {"lora_name": name})

    async def pause_generation(self, mode: str = "abort") -> None:
        """``abort`` | ``retract`` | ``in_place`` (SGLang's pause modes)."""
        await self._admin("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._admin("POST", "/continue_generation", {})

    async def close(self) -> None:
        await self._pool.aclose()

    async def __aenter__(self) -> SGLangEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Response:
        """Send with retries on connect errors, dropped connections and 5xx; never on 4xx."""
        data = None if body is None else orjson.dumps(body)
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                response = await self._pool.request(method, path, data, timeout=self.timeout)
            except ReadTimeout as exc:
                raise _RequestTimedOut(str(exc)) from exc
            except HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code >= 400:
                raise _RequestFailed(f"{path} rejected with HTTP {response.status_code}: {_error_message(response)}")
            return response
        raise _RequestFailed(f"{path} failed after {self.retries + 1} attempts; last error: {last_error}")

    async def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Response:
        try:
            return await self._request(method, path, body)
        except _RequestFailed as exc:
            raise EngineAdminError(f"{self.base_url}: {exc}") from exc
        except _RequestTimedOut as exc:
            raise EngineAdminError(f"{self.base_url}{path} timed out: {exc}") from exc

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await self._pool.request("POST", "/abort_request", orjson.dumps({"rid": rid}), timeout=5.0)
        except HTTPError:
            pass  # the server is unreachable; the request dies with it

    async def _facts(self) -> dict[str, Any]:
        """``/get_server_info``, fetched once however many requests start at the same moment."""
        async with self._facts_lock:
            if self._server_info is None:
                try:
                    info = orjson.loads((await self._request("GET", "/get_server_info")).content)
                except _RequestTimedOut as exc:
                    raise _RequestFailed(f"/get_server_info timed out: {exc}") from exc
                self._server_info = info
                if self.weight_version is None and info.get("weight_version") is not None:
                    self.weight_version = str(info["weight_version"])
            return self._server_info

    async def _resolved_context_length(self) -> int:
        if self.context_length is None:
            info = await self._facts()
            length = info.get("context_length")
            if length is None:
                models = orjson.loads((await self._request("GET", "/v1/models")).content)
                length = models["data"][0]["max_model_len"]
            self.context_length = int(length)
        return self.context_length

    async def _resolve_routing_shape(self) -> None:
        if self.routing_shape is not None:
            return
        info = await self._facts()
        layers, topk = info.get("num_hidden_layers"), info.get("num_experts_per_tok")
        if not (layers and topk):
            raise ValueError(
                "routed experts requested but their shape is unknown: pass num_layers= (num_hidden_layers) "
                "and topk= (num_experts_per_tok) of the served model to SGLangEngine"
            )
        self.routing_shape = (int(layers), int(topk))


async def _sleep_unless(wake: asyncio.Event, seconds: float) -> None:
    """Sleep, but return early when ``wake`` is set (the caller aborted)."""
    if wake.is_set():
        return
    try:
        await asyncio.wait_for(wake.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def _aborted(input_ids: list[int], error: str) -> Generation:
    return Generation([], [], "abort", prompt_tokens=len(input_ids), error=error)


def _error_message(response: Response) -> str:
    try:
        body = orjson.loads(response.content)
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error_message"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]
