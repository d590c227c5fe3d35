"""What every foreign adapter shares: lazy imports, JSON-safe infos, per-env global RNG state, specs."""

from __future__ import annotations

import contextlib
import importlib
import json
import random
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from miles_envs.registry.spec import EnvSpec
from miles_envs.integrations.foreign.naming import registry_id


def require(module: str, extra: str, distribution: str | None = None) -> ModuleType:
    """Import a foreign library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this env needs {distribution or module} ({exc}); pip install 'miles-envs[{extra}]'"
        ) from exc


def jsonable(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a foreign info dict (objects with addresses would break determinism checks)."""
    kept = {}
    for key, value in info.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


def foreign_spec(
    namespace: str, foreign_id: str, entry_point: str, *, description: str, tags: list[str],
    max_turns: int | None = None, kwargs: dict[str, Any] | None = None,
) -> EnvSpec:
    return EnvSpec(
        id=registry_id(namespace, foreign_id),
        entry_point=entry_point,
        kwargs={"env_id": foreign_id, **(kwargs or {})},
        max_turns=max_turns,
        description=description,
        tags=["foreign", namespace, *tags],
        source=f"foreign:{namespace}",
        origin=namespace,
    )


_GLOBAL_RNG = threading.RLock()


class PrivateGlobalRandom:
    """Gives one env its own stream of the process-global ``random`` and ``numpy.random`` state.

    GEM and TextArena seed and draw from the global generators, so two episodes running in parallel
    would perturb each other. Each call into the library runs with this env's saved state swapped in.
    """

    def __init__(self, seed: int = 0) -> None:
        with self.active():
            random.seed(seed)
            np.random.seed(seed)

    _py_state: Any = None
    _np_state: Any = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with _GLOBAL_RNG:
            outer_py, outer_np = random.getstate(), np.random.get_state()
            if self._py_state is not None:
                random.setstate(self._py_state)
                np.random.set_state(self._np_state)
            try:
                yield
            finally:
                self._py_state, self._np_state = random.getstate(), np.random.get_state()
                random.setstate(outer_py)
                np.random.set_state(outer_np)
