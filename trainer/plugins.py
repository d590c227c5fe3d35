"""Plug-points selected by name, or by import path for user code (``"pkg.module:function"``)."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable


class PluginError(ValueError):
    """A plug-point name is neither a built-in nor an importable callable."""


def resolve(kind: str, spec: str | Callable[..., Any], builtins: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """Return the callable for ``spec``: a callable as-is, a built-in name, or ``module:attr``."""
    if callable(spec):
        return spec
    if spec in builtins:
        return builtins[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"{kind} {spec!r}: cannot import it ({exc}); use 'package.module:function'") from exc
        if not callable(target):
            raise PluginError(f"{kind} {spec!r} is not callable")
        return target
    close = difflib.get_close_matches(spec, builtins, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise PluginError(
        f"unknown {kind} {spec!r}: built-ins are {', '.join(sorted(builtins))}, "
        f"or give an import path 'package.module:function'.{hint}"
    )
