"""Persistent registrations made by the CLI: a user TOML and a project-local ``miles-envs.toml``.

Writes are read-modify-write under a file lock, through a temp file + fsync + rename, so concurrent
writers and a crash mid-write lose nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from filelock import FileLock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from miles_envs.registry.errors import DuplicateEnv, EnvNotFound, RegistryError

PROJECT_FILE = "miles-envs.toml"


def user_store_path() -> Path:
    home = os.environ.get("MILES_ENVS_HOME")
    if home:
        return Path(home) / "registry.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir("miles-envs")) / "registry.toml"


def find_project_store(start: Path | None = None) -> Path | None:
    """The nearest ``miles-envs.toml`` from ``start`` (default: cwd) upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


class Store:
    """One TOML file of ``[envs."ns/Name-v0"]`` tables."""

    def __init__(self, path: Path, scope: str) -> None:
        self.path = Path(path)
        self.scope = scope

    def read(self) -> dict[str, dict[str, Any]]:
        envs = self._read_raw()
        for record in envs.values():
            record["entry_point"] = self._absolute(record["entry_point"])
        return envs

    def add(self, env_id: str, record: dict[str, Any], *, override: bool = False) -> None:
        record = {**record, "entry_point": self._relative(record["entry_point"])}
        try:
            tomli_w.dumps(record)
        except TypeError as exc:
            raise RegistryError(f"{env_id}: kwargs must be TOML-representable (no null values): {exc}") from exc
        with self._lock():
            envs = self._read_raw()
            if env_id in envs and not override:
                raise DuplicateEnv(f"{env_id} is already registered in {self.path}; pass --override to replace it")
            envs[env_id] = record
            self._write(envs)

    def remove(self, env_id: str) -> None:
        if env_id not in self._read_raw():  # checked before locking: a mistaken id leaves no lock file behind
            raise EnvNotFound(f"{env_id} is not registered in {self.path}")
        with self._lock():
            envs = self._read_raw()
            if env_id not in envs:
                raise EnvNotFound(f"{env_id} is not registered in {self.path}")
            del envs[env_id]
            self._write(envs)

    # -- internals -----------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=60)

    def _read_raw(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.path.read_text(encoding="utf-8")).get("envs", {})
        except FileNotFoundError:
            return {}
        except tomllib.TOMLDecodeError as exc:
            raise RegistryError(f"{self.path} is not valid TOML ({exc}); fix or delete it") from exc

    def _write(self, envs: dict[str, Any]) -> None:
        payload = tomli_w.dumps({"envs": envs}).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _absolute(self, entry_point: str) -> str:
        """File entry points are stored relative to a project file, so a checkout can move."""
        target, _, attr = entry_point.rpartition(":")
        if target.endswith(".py") and not os.path.isabs(target):
            return f"{(self.path.parent / target).resolve()}:{attr}"
        return entry_point

    def _relative(self, entry_point: str) -> str:
        target, _, attr = entry_point.rpartition(":")
        if not target.endswith(".py"):
            return entry_point
        absolute = Path(target).expanduser().resolve()
        if self.scope == "project":
            try:
                return f"{absolute.relative_to(self.path.parent.resolve())}:{attr}"
            except ValueError:
                pass
        return f"{absolute}:{attr}"
