"""``make_engine(spec)``: the engine named on a command line.

Specs: ``scripted`` or ``scripted:REPLY TEXT`` (needs a tokenizer; ``replies=`` gives a list); ``sglang://HOST:PORT`` with
optional query options (``?timeout=60&context_length=32768&num_layers=48&topk=8&retries=3&
max_connections=1024``); ``embedded:PATH`` (the in-process engine).
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from miles_envs.engine import Engine

SPEC_FORMS = "scripted[:REPLY], sglang://HOST:PORT[?option=value&...], embedded:PATH"
DEFAULT_SCRIPTED_REPLY = "Done."

_SGLANG_OPTIONS: dict[str, type] = {
    "timeout": float,
    "connect_timeout": float,
    "context_length": int,
    "num_layers": int,
    "topk": int,
    "retries": int,
    "backoff_s": float,
    "max_connections": int,
}


class EngineSpecError(ValueError):
    """An engine spec that cannot be turned into an engine; the message says how to fix it."""


def make_engine(spec: str, tokenizer: Any = None, replies: list[str] | None = None) -> Engine:
    """``replies`` (scripted only) replaces the single reply of ``scripted[:REPLY]``."""
    kind, _, rest = spec.partition(":")
    if kind == "scripted":
        return _scripted(replies or [rest or DEFAULT_SCRIPTED_REPLY], tokenizer)
    if kind == "sglang":
        return _sglang(spec)
    if kind == "embedded":
        return _embedded(rest)
    raise EngineSpecError(f"unknown engine spec {spec!r}: use one of {SPEC_FORMS}")


def _scripted(replies: list[str], tokenizer: Any) -> Engine:
    from miles_envs.agents.scripted import ScriptedEngine

    if tokenizer is None:
        raise EngineSpecError("the scripted engine needs a tokenizer to produce real token ids: pass tokenizer=")
    return ScriptedEngine(tokenizer, replies)


def _sglang(spec: str) -> Engine:
    from miles_envs.agents.sglang import SGLangEngine

    parts = urlsplit(spec)
    if not parts.hostname or parts.port is None:
        raise EngineSpecError(f"{spec!r} needs a host and a port, e.g. sglang://127.0.0.1:30000")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, strict_parsing=bool(parts.query)):
        if key not in _SGLANG_OPTIONS:
            raise EngineSpecError(f"unknown sglang option {key!r}: choose from {', '.join(_SGLANG_OPTIONS)}")
        try:
            options[key] = _SGLANG_OPTIONS[key](value)
        except ValueError:
            raise EngineSpecError(f"sglang option {key}={value!r} is not a {_SGLANG_OPTIONS[key].__name__}") from None
    return SGLangEngine(f"http://{parts.hostname}:{parts.port}", **options)


def _embedded(path: str) -> Engine:
    if not path:
        raise EngineSpecError("embedded needs a model directory: embedded:PATH")
    try:
        module = importlib.import_module("miles_envs.agents.embedded")
    except ModuleNotFoundError as exc:
        if exc.name != "miles_envs.agents.embedded":
            raise  # the module exists but one of its own dependencies is missing
        raise EngineSpecError(
            "the embedded engine is not available yet in this install; use --engine scripted or sglang://HOST:PORT"
        ) from None
    return module.EmbeddedEngine.from_path(path)
