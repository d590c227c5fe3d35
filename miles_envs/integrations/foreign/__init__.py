"""Foreign env libraries in the registry: ``gem:``, ``textarena:``, ``skyrl:``, ``pz:``, ``openenv:``.

Each library is an optional extra, imported only when one of its envs is listed or made. A foreign id
such as ``gem:game:GuessTheNumber-v0-hard`` does not fit the registry's ``namespace/Name-vN`` form, so
it is mapped: the library prefix becomes the namespace and a version that the library writes before a
variant suffix moves to the end (``gem/game:GuessTheNumber-hard-v0``); an id without a version gets
``-v0``. ``foreign_spec`` accepts either spelling; the spec keeps the library's own id in
``kwargs["env_id"]`` so nothing is lost in the mapping.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from miles_envs.registry.errors import EnvNotFound
from miles_envs.registry.spec import EnvSpec
from miles_envs.registry.suggest import close_ids
from miles_envs.integrations.foreign.naming import registry_id


@dataclass(frozen=True)
class ForeignLibrary:
    namespace: str  # registry namespace and id prefix
    distribution: str  # what pip installs
    module: str  # the library's import name (probed without importing it)
    adapter: str  # our adapter module
    extra: str  # the miles-envs extra that installs it

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def load_adapter(self) -> ModuleType:
        if not self.installed:
            raise EnvNotFound(
                f"{self.namespace}: envs come from {self.distribution}, which is not installed; "
                f"pip install 'miles-envs[{self.extra}]'"
            )
        return importlib.import_module(self.adapter)


LIBRARIES: dict[str, ForeignLibrary] = {
    lib.namespace: lib
    for lib in (
        ForeignLibrary("gem", "gem-llm", "gem", "miles_envs.integrations.foreign.gem", "gem"),
        ForeignLibrary("textarena", "textarena", "textarena", "miles_envs.integrations.foreign.textarena", "textarena"),
        ForeignLibrary("skyrl", "skyrl-gym", "skyrl_gym", "miles_envs.integrations.foreign.skyrl", "skyrl"),
        ForeignLibrary("pz", "pettingzoo", "pettingzoo", "miles_envs.integrations.foreign.pettingzoo", "pettingzoo"),
        ForeignLibrary("openenv", "openenv-core", "openenv", "miles_envs.integrations.foreign.openenv", "openenv"),
    )
}


def installed_libraries() -> list[ForeignLibrary]:
    return [lib for lib in LIBRARIES.values() if lib.installed]


def foreign_specs() -> list[EnvSpec]:
    """Every env of every installed foreign library (imports those libraries; for ``list --all``)."""
    specs: list[EnvSpec] = []
    for lib in installed_libraries():
        adapter = lib.load_adapter()
        specs.extend(adapter.spec(foreign_id) for foreign_id in adapter.foreign_ids())
    return specs


def is_foreign_id(env_id: str) -> bool:
    """True for ``lib:...`` and ``lib/...`` ids of a known foreign library."""
    return _split(env_id) is not None


def foreign_spec(env_id: str) -> EnvSpec:
    """The spec of one foreign env, by ``lib:foreign-id`` or by its registry id ``lib/Name-vN``."""
    split = _split(env_id)
    if split is None:
        raise EnvNotFound(f"{env_id!r} names no foreign library; prefixes: {', '.join(f'{n}:' for n in LIBRARIES)}")
    lib, rest, prefixed = split
    adapter = lib.load_adapter()
    known = adapter.foreign_ids()
    if prefixed and rest in known:
        return adapter.spec(rest)
    by_registry_id = {registry_id(lib.namespace, foreign_id): foreign_id for foreign_id in known}
    wanted = registry_id(lib.namespace, rest) if prefixed else env_id
    if wanted in by_registry_id:
        return adapter.spec(by_registry_id[wanted])
    if hasattr(adapter, "spec_for_unlisted"):
        spec = adapter.spec_for_unlisted(rest)
        if spec is not None:
            return spec
    close = close_ids(wanted, by_registry_id)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise EnvNotFound(f"{lib.distribution} has no env {rest!r}{hint} (`miles-envs list --all` shows them)")


def resolve_id(env_id: str) -> EnvSpec | None:
    """The registry's resolver for foreign ids (declared in ``registry.core.ID_RESOLVERS``)."""
    return foreign_spec(env_id) if is_foreign_id(env_id) else None


def _split(env_id: str) -> tuple[ForeignLibrary, str, bool] | None:
    for separator, prefixed in ((":", True), ("/", False)):
        head, found, rest = env_id.partition(separator)
        if found and head in LIBRARIES:
            return LIBRARIES[head], rest, prefixed
    return None


__all__ = ["LIBRARIES", "ForeignLibrary", "foreign_spec", "foreign_specs", "installed_libraries", "is_foreign_id", "registry_id", "resolve_id"]
