"""make_sandbox and the configuration-time errors of each backend."""

from __future__ import annotations

import pytest

from miles_envs.sandbox import BACKENDS, SandboxError, make_sandbox
from miles_envs.sandbox.docker_backend import DockerSandbox
from miles_envs.sandbox.local import LocalSandbox

from .conftest import docker_unavailable


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="local, docker, e2b"):
        make_sandbox("firecracker")


def test_backend_names():
    assert set(BACKENDS) == {"local", "docker", "e2b"}


def test_local_by_name():
    assert isinstance(make_sandbox("local", workdir_mb=8), LocalSandbox)


def test_missing_bwrap_gives_the_install_hint(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        make_sandbox("local")


def test_missing_interpreter_is_named():
    with pytest.raises(SandboxError, match="/no/python3"):
        make_sandbox("local", python="/no/python3")


def test_unreachable_docker_daemon_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxError, match="start dockerd or set DOCKER_HOST"):
        make_sandbox("docker")


def test_e2b_without_key_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(SandboxError, match="E2B_API_KEY"):
        make_sandbox("e2b")


@pytest.mark.docker
async def test_missing_docker_image_names_the_build_script():
    if reason := docker_unavailable():
        pytest.skip(reason)
    box = DockerSandbox(image="miles-envs-no-such-image:0")
    with pytest.raises(SandboxError, match="build_sandbox_image.sh"):
        await box.start()
