"""A connected docker client, shared by the docker backend and the reaper."""

from __future__ import annotations

from typing import Any

from miles_envs.sandbox.base import SandboxError


def docker_client(client: Any = None) -> Any:
    """A connected docker.DockerClient, or SandboxError saying what is missing."""
    if client is not None:
        return client
    try:
        import docker
    except ImportError as e:
        raise SandboxError("the docker backend needs the docker SDK: pip install 'miles-envs[docker]'") from e
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise SandboxError(f"no docker daemon answers ({e}); start dockerd or set DOCKER_HOST") from e
    return client
