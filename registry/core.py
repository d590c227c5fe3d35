"""The env registry: ids → EnvSpec from built-ins, plugins, the user and project stores, and code.

Later sources shadow earlier ones (builtin < plugin < user < project); registrations made in code
are kept across reloads and clash with any other source unless ``override=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from pkgutil import resolve_name
from typing import Any

from miles_envs.env import Env
from miles_envs.registry.errors import DuplicateEnv, EnvNotFound
from miles_envs.registry.plugins import plugin_specs
from miles_envs.registry.spec import EnvSpec
from miles_envs.registry.store import Store, find_project_store, user_store_path
from miles_envs.registry.suggest import close_ids

# Id families resolved outside the stores (``lib:...`` foreign ids): ``module:function`` factories that
# return the id's EnvSpec, or None when the id is not theirs. Declared by name, so the registry never
# imports them (they build on the registry's spec types) and their libraries load only when asked.
ID_RESOLVERS = ("miles_envs.integrations.foreign:resolve_id",)


def builtin_specs() -> list[EnvSpec]:
    from miles_envs.envs import BUILTIN_SPECS

    return [EnvSpec(**record, source="builtin") for record in BUILTIN_SPECS]


def _stored_specs(store: Store) -> list[EnvSpec]:
    return [EnvSpec(id=env_id, **record, source=store.scope, origin=str(store.path)) for env_id, record in store.read().items()]


class Registry:
    def __init__(self) -> None:
        self._code: dict[str, EnvSpec] = {}
        self._loaded: dict[str, EnvSpec] | None = None

    # -- sources -------------------------------------------------------------------------------
    def _specs(self) -> dict[str, EnvSpec]:
        if self._loaded is None:
            loaded: dict[str, EnvSpec] = {}
            for spec in self._discovered():
                loaded[spec.id] = spec
            self._loaded = loaded
        return {**self._loaded, **self._code}

    def _discovered(self) -> Iterable[EnvSpec]:
        yield from builtin_specs()
        yield from plugin_specs()
        yield from _stored_specs(Store(user_store_path(), "user"))
        project = find_project_store()
        if project is not None:
            yield from _stored_specs(Store(project, "project"))

    def reload(self) -> None:
        """Forget discovered specs (stores and plugins are re-read on next use)."""
        self._loaded = None

    # -- API -----------------------------------------------------------------------------------
    def register(
        self,
        id: str,
        entry_point: str | Callable[..., Env],
        *,
        kwargs: dict[str, Any] | None = None,
        max_turns: int | None = None,
        description: str = "",
        tags: Iterable[str] = (),
        override: bool = False,
    ) -> EnvSpec:
        spec = EnvSpec(
            id=id, entry_point=entry_point, kwargs=dict(kwargs or {}), max_turns=max_turns,
            description=description, tags=list(tags), source="code",
        )
        existing = self._specs().get(id)
        if existing is not None and not override:
            raise DuplicateEnv(f"{id} is already registered ({existing.source}); pass override=True to replace it")
        if callable(entry_point):
            spec.check()  # already imported: check it now (a 'module:Class' string stays lazy until make)
        self._code[id] = spec
        return spec

    def unregister(self, id: str) -> None:
        if id not in self._code:
            raise EnvNotFound(f"{id} was not registered in code")
        del self._code[id]

    def spec(self, id: str) -> EnvSpec:
        specs = self._specs()
        if id in specs:
            return specs[id]
        for resolver in ID_RESOLVERS:
            found = resolve_name(resolver)(id)
            if found is not None:
                return found
        raise EnvNotFound(self._not_found_message(id, specs))

    def make(self, id: str, **overrides: Any) -> Env:
        return self.spec(id).make(**overrides)

    def list(self, tag: str | None = None) -> list[EnvSpec]:
        specs = sorted(self._specs().values(), key=lambda s: s.id)
        return [s for s in specs if tag is None or tag in s.tags]

    def persist(self, spec: EnvSpec, scope: str, *, override: bool = False) -> Path:
        """Write a registration to the user or project store (the CLI's ``register``)."""
        store = store_for(scope)
        existing = self._specs().get(spec.id)
        if existing is not None and existing.source in ("builtin", "plugin") and not override:
            raise DuplicateEnv(f"{spec.id} is a {existing.source} env; pick another id or pass --override")
        store.add(spec.id, spec.to_record(), override=override)
        self.reload()
        return store.path

    @staticmethod
    def _not_found_message(id: str, specs: dict[str, EnvSpec]) -> str:
        close = close_ids(id, specs)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        return f"unknown env id {id!r}{hint} (`miles-envs list` shows all registered envs)"


def store_for(scope: str) -> Store:
    if scope == "user":
        return Store(user_store_path(), "user")
    if scope == "project":
        return Store(find_project_store() or Path.cwd() / "miles-envs.toml", "project")
    raise ValueError(f"unknown scope {scope!r}: use 'user' or 'project'")


default_registry = Registry()
register = default_registry.register
unregister = default_registry.unregister
make = default_registry.make
spec = default_registry.spec
list_specs = default_registry.list
