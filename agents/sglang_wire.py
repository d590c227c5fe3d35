"""SGLang native ``/generate`` wire format: request bodies, response bodies, and their parsing.

Shared by the HTTP client (``SGLangEngine``) and the loopback protocol server so that both sides
speak exactly the format documented in docs/sglang-protocol.md. Pure functions, no I/O.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pybase64

from miles_envs.engine import Generation, SamplingParams, SpecStats
from miles_envs.token_ids import TokenIds


class ProtocolError(ValueError):
    """A response that does not follow the wire format (the server or a proxy is broken)."""


# ----------------------------------------------------------------------------- request side


def generate_request(
    input_ids: list[int],
    sampling: SamplingParams,
    *,
    max_new_tokens: int,
    return_routed_experts: bool = False,
    routed_experts_start: int = 0,
    lora: str | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /generate`` for one token-in/token-out request."""
    params = sampling.to_sglang()
    params["max_new_tokens"] = max_new_tokens
    body: dict[str, Any] = {
        "input_ids": input_ids,
        "sampling_params": params,
        "return_logprob": True,
        "stream": False,
    }
    if return_routed_experts:
        body["return_routed_experts"] = True
        body["routed_experts_start_len"] = routed_experts_start
    if lora is not None:
        body["lora_path"] = lora
    if rid is not None:
        body["rid"] = rid
    return body


def encode_generate_request(input_ids: Sequence[int], sampling: SamplingParams, **options: Any) -> list[bytes]:
    """``generate_request`` as JSON in chunks, ready to send; the ids' JSON comes from ``ids_json``."""
    body = generate_request([], sampling, **options)
    del body["input_ids"]
    return [b'{"input_ids":', *ids_json(input_ids), b",", orjson.dumps(body)[1:]]


_IDS_JSON = "sglang-ids-json"  # the tag of this module's work in ``TokenIds.engine_cache``


def ids_json(ids: Sequence[int]) -> list[bytes]:
    """A token id list as a JSON array, in chunks.

    The history of an episode is re-sent every turn but only grows: for a ``TokenIds`` stream the
    chunks of the prefix already encoded are kept on the stream and only the appended ids are
    encoded (the prefix is reused only while the stream reports no edit, so the JSON is always that
    of the current ids).
    """
    if not isinstance(ids, TokenIds):
        return [orjson.dumps(ids)]
    cache = ids.engine_cache
    if cache is not None and cache[0] == _IDS_JSON and cache[2] == ids.edits and len(ids) >= cache[1]:
        _, done, _, chunks = cache
    else:
        done, chunks = 0, []
    if len(ids) > done:
        fresh = orjson.dumps(ids[done:] if done else ids)
        chunks.append(b"," + fresh[1:-1] if done else fresh[:-1])
    ids.engine_cache = (_IDS_JSON, len(ids), ids.edits, chunks)
    return [*chunks, b"]"] if chunks else [b"[]"]


def sampling_from_request(params: dict[str, Any]) -> SamplingParams:
    """Inverse of ``SamplingParams.to_sglang`` (server side); unknown keys are ignored."""
    return SamplingParams(
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=int(params.get("top_k", -1)),
        max_new_tokens=int(params.get("max_new_tokens", 128)),
        stop=_as_list(params.get("stop")),
        stop_token_ids=[int(t) for t in params.get("stop_token_ids") or []],
        seed=params.get("sampling_seed"),
    )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# ----------------------------------------------------------------------------- routed experts


def encode_routed_experts(rows: np.ndarray) -> str:
    """``[rows, layers, topk]`` → base64 of little-endian int32 in C order (SGLang's encoding)."""
    return pybase64.b64encode(np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(payload: str, rows: int, num_layers: int, topk: int) -> np.ndarray:
    """Base64 int32 → ``[rows, num_layers, topk]``; the element count must match exactly."""
    try:  # SIMD: ~50x CPython's decoder on routing rows; a bytearray gives a writable array without a copy
        raw = pybase64.b64decode_as_bytearray(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ProtocolError(f"routed_experts is not valid base64: {exc}") from exc
    flat = np.frombuffer(raw, dtype="<i4")
    expected = rows * num_layers * topk
    if flat.size != expected:
        raise ProtocolError(
            f"routed_experts holds {flat.size} int32 values, expected {rows} rows x {num_layers} layers x "
            f"{topk} topk = {expected}; check the engine's num_layers/topk against the served model"
        )
    return flat.astype(np.int32, copy=False).reshape(rows, num_layers, topk)


# ----------------------------------------------------------------------------- response side


def finish_reason_json(generation: Generation) -> dict[str, Any]:
    if generation.finish_reason == "stop":
        return {"type": "stop", "matched": generation.matched_stop}
    if generation.finish_reason == "length":
        return {"type": "length", "length": len(generation.output_ids)}
    return {"type": "abort", "message": generation.error or "Aborted", "status_code": None, "err_type": None}


def generate_response(
    generation: Generation,
    *,
    rid: str,
    prompt_tokens: int,
    weight_version: str,
    return_routed_experts: bool,
) -> dict[str, Any]:
    """The JSON body SGLang returns for a non-streaming ``/generate`` with ``return_logprob``."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish_reason_json(generation),
        "prompt_tokens": prompt_tokens,
        "weight_version": generation.weight_version or weight_version,
        "completion_tokens": len(generation.output_ids),
        "cached_tokens": generation.cached_tokens,
        "output_token_logprobs": [[lp, tid, None] for lp, tid in zip(generation.logprobs, generation.output_ids)],
    }
    if generation.version_spans:  # extension: which weights sampled which tokens (docs/sglang-protocol.md)
        meta["weight_version_spans"] = [[start, version] for start, version in generation.version_spans]
    if return_routed_experts and generation.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(generation.routed_experts)
    if generation.spec is not None and generation.spec.verify_ct:
        spec = generation.spec
        meta.update(
            spec_verify_ct=spec.verify_ct,
            spec_accept_rate=spec.accept_rate,
            spec_accept_length=len(generation.output_ids) / spec.verify_ct,
            spec_accept_token_num=spec.accepted_tokens,
            spec_draft_token_num=spec.draft_tokens,
        )
    return {"text": "", "output_ids": list(generation.output_ids), "meta_info": meta}


_SPEC_COUNT_SPELLINGS = (
    ("spec_num_correct_drafts", "spec_num_proposed_drafts"),
    ("spec_accepted_drafts", "spec_proposed_drafts"),
    ("spec_accept_token_num", "spec_draft_token_num"),
)


def spec_stats_from_meta(meta: dict[str, Any]) -> SpecStats | None:
    """Speculative counters from any SGLang release's spelling; rates are turned back into counts."""
    verify_ct = int(meta.get("spec_verify_ct") or 0)
    if not verify_ct:
        return None
    for accepted_key, drafted_key in _SPEC_COUNT_SPELLINGS:
        if accepted_key in meta and drafted_key in meta:
            return SpecStats(verify_ct, int(meta[accepted_key]), int(meta[drafted_key]))
    # Oldest releases report only rates: accept_length = completion / verify_ct, rate = accepted / drafted.
    completion = int(meta.get("completion_tokens") or 0)
    accepted = max(completion - verify_ct, 0)
    rate = float(meta.get("spec_accept_rate") or 0.0)
    drafted = round(accepted / rate) if rate > 0 else 0
    return SpecStats(verify_ct, accepted, drafted)


_ROUTED_KEY = b'"routed_experts":'
_JSON_SPACE = b" \t\r\n"


def load_generate_body(raw: bytes) -> Any:
    """A raw ``/generate`` response body as JSON, its routing payload left as bytes.

    The base64 routing rows are most of a routed response (147 KB for one turn of a 48-layer top-8
    MoE), and a JSON parser walks and copies them character by character. They are cut out of the
    raw bytes first (a base64 string holds no quote or backslash, so it ends at the next quote) and
    the parser sees the rest with an empty string in their place. The cut is used only when the
    parsed ``meta_info.routed_experts`` is that empty string; anything else parses the body whole.
    """
    at = raw.find(_ROUTED_KEY)  # outside a key, JSON escapes the quotes: only a key matches
    if at < 0:
        return orjson.loads(raw)
    start = at + len(_ROUTED_KEY)
    while start < len(raw) and raw[start] in _JSON_SPACE:
        start += 1
    end = raw.find(b'"', start + 1) if raw[start:start + 1] == b'"' else -1
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return orjson.loads(raw)
    try:
        body = orjson.loads(b"".join((memoryview(raw)[:start + 1], memoryview(raw)[end:])))
    except orjson.JSONDecodeError:
        return orjson.loads(raw)
    meta = body.get("meta_info") if isinstance(body, dict) else None
    if not isinstance(meta, dict) or meta.get("routed_experts") != "":
        return orjson.loads(raw)
    meta["routed_experts"] = memoryview(raw)[start + 1:end]
    return body


def parse_generate_response(
    body: Any,
    *,
    prompt_len: int,
    routed_experts_start: int | None,
    routing_shape: tuple[int, int] | None,
) -> Generation:
    """Validate and convert a ``/generate`` response body into a ``Generation``.

    ``routed_experts_start`` is None when routing was not requested. Raises ``ProtocolError`` when
    the body breaks an invariant the trainer relies on (lengths, ids, routing row count).
    """
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise ProtocolError(f"response has no meta_info object: {str(body)[:200]}")
    meta = body["meta_info"]
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length", "abort"):
        raise ProtocolError(f"unknown finish_reason {finish!r}")

    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise ProtocolError("meta_info.output_token_logprobs is missing: the request must set return_logprob")
    completion = int(meta.get("completion_tokens", len(entries)))
    if len(entries) != completion:
        raise ProtocolError(
            f"output_token_logprobs has {len(entries)} entries but completion_tokens is {completion}"
        )
    try:
        logprobs = [float(entry[0]) for entry in entries]
        output_ids = [int(entry[1]) for entry in entries]
    except TypeError as exc:
        raise ProtocolError(f"output_token_logprobs holds a null logprob or token id: {exc}") from exc
    if "output_ids" in body and body["output_ids"] != output_ids:
        raise ProtocolError("output_ids disagree with the token ids in output_token_logprobs")

    routed = None
    if routed_experts_start is not None and output_ids and kind != "abort":
        if "routed_experts" not in meta:
            raise ProtocolError(
                "routed experts were requested but the response has none: start SGLang with "
                "--enable-return-routed-experts"
            )
        if routing_shape is None:
            raise ProtocolError("routed_experts returned but the engine was given no (num_layers, topk)")
        rows = prompt_len + len(output_ids) - 1 - routed_experts_start
        routed = decode_routed_experts(meta["routed_experts"], rows, *routing_shape)

    matched = finish.get("matched") if isinstance(finish, dict) else None
    return Generation(
        version_spans=_version_spans(meta.get("weight_version_spans"), len(output_ids)),
        output_ids=output_ids,
        logprobs=logprobs,
        finish_reason=kind,
        routed_experts=routed,
        weight_version=None if meta.get("weight_version") is None else str(meta["weight_version"]),
        prompt_tokens=int(meta.get("prompt_tokens", prompt_len)),
        cached_tokens=int(meta.get("cached_tokens") or 0),
        spec=spec_stats_from_meta(meta),
        matched_stop=matched,
        error=(finish.get("message") or "aborted by the server") if kind == "abort" else None,
    )


def _version_spans(raw: Any, n_tokens: int) -> list[tuple[int, str]]:
    """The ``weight_version_spans`` extension, checked: starts increasing from 0 and inside the output."""
    if not raw:
        return []
    try:
        spans = [(int(start), str(version)) for start, version in raw]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"weight_version_spans must be [[start, version], ...], got {str(raw)[:200]}") from exc
    starts = [start for start, _ in spans]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] > max(n_tokens - 1, 0):
        raise ProtocolError(f"weight_version_spans starts {starts} must increase from 0 within {n_tokens} output tokens")
    return spans
