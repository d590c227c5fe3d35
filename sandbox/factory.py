"""One constructor for every backend, so configs can name the sandbox as a string."""

from __future__ import annotations

import importlib
from typing import Any

from miles_envs.sandbox.base import Sandbox

BACKENDS: dict[str, str] = {
    "local": "miles_envs.sandbox.local:LocalSandbox",
    "docker": "miles_envs.sandbox.docker_backend:DockerSandbox",
    "e2b": "miles_envs.sandbox.e2b_backend:E2BSandbox",
}


def make_sandbox(backend: str = "local", **kwargs: Any) -> Sandbox:
    """Build a sandbox by backend name. Every backend takes ``limits=Limits(...)`` and
    ``timeout=`` (seconds per execution); the rest are backend options:

    - ``local``: ``python`` (interpreter path inside, default /usr/bin/python3), ``workdir_mb``.
    - ``docker``: ``image`` (default miles-envs-sandbox:latest, built by
      scripts/build_sandbox_image.sh), ``cpus``, ``workdir_mb``, ``client`` (a docker.DockerClient).
    - ``e2b``: ``api_key`` (default $E2B_API_KEY), ``template``, ``sdk`` (the module providing
      ``AsyncSandbox``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)
