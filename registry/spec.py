"""EnvSpec: what an env id stands for, and how its entry point is resolved."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gymnasium.envs.registration import parse_env_id

from miles_envs.env import Env
from miles_envs.registry.errors import EntryPointError, InvalidEnvId, NotAnEnv

SOURCES = ("builtin", "plugin", "user", "project", "code")


def parse_id(env_id: str) -> tuple[str, str, int]:
    """``namespace/Name-vN`` parsed as Gymnasium does; namespace and version are required here."""
    try:
        namespace, name, version = parse_env_id(env_id)
    except Exception as exc:
        raise InvalidEnvId(f"malformed env id {env_id!r}: use the form 'namespace/Name-v0'") from exc
    if namespace is None or version is None:
        raise InvalidEnvId(f"env id {env_id!r} needs a namespace and a version: use the form 'namespace/Name-v0'")
    return namespace, name, version


@dataclass
class EnvSpec:
    id: str
    entry_point: str | Callable[..., Env]
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_turns: int | None = None
    description: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = "code"
    origin: str | None = None  # the file or package that declared it

    def __post_init__(self) -> None:
        self.namespace, self.name, self.version = parse_id(self.id)
        if isinstance(self.entry_point, str) and ":" not in self.entry_point:
            raise EntryPointError(
                f"entry point {self.entry_point!r} of {self.id}: use 'package.module:Class' or 'path/to/file.py:Class'"
            )

    def load(self) -> Callable[..., Env]:
        """Resolve the entry point to a callable (usually an Env subclass)."""
        if callable(self.entry_point):
            return self.entry_point
        return load_entry_point(self.entry_point, self.id)

    def check(self, **overrides: Any) -> Callable[..., Env]:
        """Load the entry point and check it can build this env with these kwargs, so a wrong entry
        point or a misspelt kwarg fails when it is registered rather than at the first ``make()``."""
        factory = self.load()
        if not inspect.isclass(factory) and not _returns_env(factory):
            raise NotAnEnv(
                f"{self.id}: {_name(self.entry_point)} is a {type(factory).__name__}, not a miles_envs.Env subclass; "
                "register the Env class (or a factory annotated '-> Env')"
            )
        kwargs = {**self.kwargs, **overrides}
        kwargs.pop("max_turns", None)  # make() passes it only to factories that take it
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            return factory
        try:
            signature.bind_partial(**kwargs)
        except TypeError as exc:
            takes = ", ".join(p for p in signature.parameters if p not in ("self", "args", "kwargs")) or "no kwargs"
            raise EntryPointError(f"{self.id}: {_name(self.entry_point)} does not accept these kwargs ({exc}); it takes: {takes}") from None
        return factory

    def class_max_turns(self) -> int | None:
        """The spec's max turns, else the class attribute the env sets (None when unknown or unloadable)."""
        if self.max_turns is not None:
            return self.max_turns
        try:
            value = getattr(self.load(), "max_turns", None)
        except Exception:  # noqa: BLE001 - a listing must not die on one broken registration
            return None
        return value if isinstance(value, int) else None

    def make(self, **overrides: Any) -> Env:
        factory = self.load()
        kwargs = {**self.kwargs, **overrides}
        max_turns = kwargs.pop("max_turns", self.max_turns)
        if max_turns is not None and "max_turns" in _parameters(factory):
            kwargs["max_turns"] = max_turns
        env = factory(**kwargs)
        if not isinstance(env, Env):
            raise NotAnEnv(
                f"{self.id}: entry point {self.entry_point!r} returned {type(env).__name__}, not a miles_envs.Env; "
                "subclass miles_envs.Env (or MultiAgentEnv)"
            )
        if max_turns is not None:
            env.max_turns = max_turns
        env.spec = self
        return env

    def to_record(self) -> dict[str, Any]:
        """The persistent-store form (TOML table)."""
        if callable(self.entry_point):
            raise EntryPointError(f"{self.id}: a callable entry point cannot be stored; use 'module:Class'")
        record: dict[str, Any] = {"entry_point": self.entry_point}
        if self.kwargs:
            record["kwargs"] = self.kwargs
        if self.max_turns is not None:
            record["max_turns"] = self.max_turns
        if self.description:
            record["description"] = self.description
        if self.tags:
            record["tags"] = list(self.tags)
        return record


def _name(entry_point: Any) -> str:
    return entry_point if isinstance(entry_point, str) else getattr(entry_point, "__qualname__", repr(entry_point))


def _returns_env(factory: Callable[..., Any]) -> bool:
    """Whether a factory function is annotated to return an Env (a plain function is taken for a mistake)."""
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to their text
        returned = getattr(factory, "__annotations__", {}).get("return")
        return isinstance(returned, str) and "Env" in returned
    return inspect.isclass(returned) and issubclass(returned, Env)


def _parameters(factory: Callable[..., Any]) -> frozenset[str]:
    """The factory's parameter names; read once per factory (``make`` runs once per episode)."""
    try:
        return _signature_names(factory)
    except TypeError:  # an unhashable factory: read every time
        return _signature_names.__wrapped__(factory)


@functools.lru_cache(maxsize=256)
def _signature_names(factory: Callable[..., Any]) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return frozenset()


def load_entry_point(entry_point: str, env_id: str = "?") -> Callable[..., Env]:
    target, _, attr = entry_point.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(Path(target), env_id)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise EntryPointError(
                f"{env_id}: cannot import module {target!r} ({type(exc).__name__}: {exc}); "
                "check that it is installed or on PYTHONPATH"
            ) from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        envs = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, Env) and v.__module__ == module.__name__]
        hint = f"; Env classes there: {', '.join(envs)}" if envs else ""
        raise EntryPointError(f"{env_id}: module {target!r} has no attribute {attr!r}{hint}") from None
    if inspect.isclass(obj) and not issubclass(obj, Env):
        raise NotAnEnv(f"{env_id}: {entry_point} is a class but not a miles_envs.Env subclass")
    if not callable(obj):
        raise NotAnEnv(f"{env_id}: {entry_point} is not callable")
    return obj


def _import_file(path: Path, env_id: str):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise EntryPointError(f"{env_id}: file {str(path)!r} does not exist; give an existing path/to/file.py:Class")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"miles_envs_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise EntryPointError(f"{env_id}: importing {path} failed ({type(exc).__name__}: {exc})") from exc
    return module
