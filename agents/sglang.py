"""SGLangEngine: async httpx client of SGLang's native ``/generate`` API and admin endpoints.

Failure taxonomy (what the env loop sees):
- connect errors, dropped connections and 5xx are retried with exponential backoff; when the
  retries run out the call returns ``finish_reason="abort"`` with the last error;
- 4xx is never retried (the request itself is wrong): ``abort`` with the server's message;
- a read timeout returns ``abort`` at once and asks the server to abort the request's ``rid``;
- a body that is not valid JSON or breaks the wire invariants returns ``abort`` with the reason.
Admin calls raise ``EngineAdminError`` instead, because they are configuration, not data.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

from miles_envs.agents.engine import Generation, SamplingParams
from miles_envs.agents.http_pool import ShardedAsyncClient
from miles_envs.agents.sglang_wire import ProtocolError, generate_request, parse_generate_response


class EngineAdminError(RuntimeError):
    """An admin endpoint refused or failed (weights, LoRA, cache, server info)."""


class _RequestFailed(Exception):
    """A request that cannot succeed (4xx, or retries exhausted); the message says why."""


class _RequestTimedOut(Exception):
    pass


_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class SGLangEngine:
    """``Engine`` backed by an SGLang server (or anything speaking its protocol) at ``base_url``.

    ``context_length`` clamps ``max_new_tokens`` so prompt + completion fits; when omitted it is read
    once from ``/get_server_info`` (or ``/v1/models``). ``num_layers``/``topk`` shape the routed
    experts (``num_hidden_layers`` and ``num_experts_per_tok`` of the served model).
    ``max_connections`` bounds open sockets; requests beyond it queue in the client. Keep it at or
    below the server's listen backlog (uvicorn: 2048), or a burst of connects overflows it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        context_length: int | None = None,
        num_layers: int | None = None,
        topk: int | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_connections: int = 1024,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.context_length = context_length
        self.routing_shape = (num_layers, topk) if num_layers and topk else None
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = ShardedAsyncClient(
            self.base_url,
            max_connections=max_connections,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._facts_lock = asyncio.Lock()
        self._server_info: dict[str, Any] | None = None

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
        rid = rid or uuid.uuid4().hex
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
        body = generate_request(
            input_ids,
            sampling,
            max_new_tokens=min(sampling.max_new_tokens, budget),
            return_routed_experts=return_routed_experts,
            routed_experts_start=routed_experts_start,
            lora=lora,
            rid=rid,
        )
        try:
            response = await self._request("POST", "/generate", body)
        except _RequestTimedOut:
            await self._abort_quietly(rid)
            return _aborted(input_ids, f"/generate timed out after {self.timeout:g}s (rid {rid} aborted)")
        except _RequestFailed as exc:
            return _aborted(input_ids, str(exc))
        try:
            return parse_generate_response(
                response.json(),
                prompt_len=len(input_ids),
                routed_experts_start=routed_experts_start if return_routed_experts else None,
                routing_shape=self.routing_shape,
            )
        except ValueError as exc:  # json.JSONDecodeError and ProtocolError are both ValueErrors
            kind = "malformed" if isinstance(exc, ProtocolError) else "malformed JSON"
            return _aborted(input_ids, f"{kind} response from /generate: {exc}")

    # ------------------------------------------------------------------ admin

    async def health(self) -> bool:
        try:
            response = await self._client.request("GET", "/health", timeout=httpx.Timeout(10.0))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def server_info(self) -> dict[str, Any]:
        return (await self._admin("GET", "/get_server_info")).json()

    async def flush_cache(self) -> None:
        await self._admin("POST", "/flush_cache")

    async def abort(self, rid: str | None = None) -> None:
        """Abort one request by ``rid``, or every request when ``rid`` is None."""
        await self._admin("POST", "/abort_request", {"rid": rid} if rid else {"abort_all": True})

    async def update_weights(self, source: Any, *, version: str | None = None) -> None:
        """Reload weights from a checkpoint directory the server can read."""
        body: dict[str, Any] = {"model_path": str(source)}
        if version is not None:
            body["weight_version"] = version
        await self._admin("POST", "/update_weights_from_disk", body)

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
        await self._client.aclose()

    async def __aenter__(self) -> SGLangEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """Send with retries on connect errors, dropped connections and 5xx; never on 4xx."""
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                response = await self._client.request(method, path, json=body)
            except _RETRYABLE as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            except httpx.TimeoutException as exc:
                raise _RequestTimedOut(str(exc)) from exc
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code >= 400:
                raise _RequestFailed(f"{path} rejected with HTTP {response.status_code}: {_error_message(response)}")
            return response
        raise _RequestFailed(f"{path} failed after {self.retries + 1} attempts; last error: {last_error}")

    async def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return await self._request(method, path, body)
        except _RequestFailed as exc:
            raise EngineAdminError(f"{self.base_url}: {exc}") from exc
        except _RequestTimedOut as exc:
            raise EngineAdminError(f"{self.base_url}{path} timed out: {exc}") from exc

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await self._client.request("POST", "/abort_request", json={"rid": rid}, timeout=httpx.Timeout(5.0))
        except httpx.HTTPError:
            pass  # the server is unreachable; the request dies with it

    async def _facts(self) -> dict[str, Any]:
        """``/get_server_info``, fetched once however many requests start at the same moment."""
        async with self._facts_lock:
            if self._server_info is None:
                try:
                    self._server_info = (await self._request("GET", "/get_server_info")).json()
                except _RequestTimedOut as exc:
                    raise _RequestFailed(f"/get_server_info timed out: {exc}") from exc
            return self._server_info

    async def _resolved_context_length(self) -> int:
        if self.context_length is None:
            info = await self._facts()
            length = info.get("context_length")
            if length is None:
                models = (await self._request("GET", "/v1/models")).json()
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


def _aborted(input_ids: list[int], error: str) -> Generation:
    return Generation([], [], "abort", prompt_tokens=len(input_ids), error=error)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
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
