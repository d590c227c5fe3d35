"""Sandboxes of each backend that can run here: local (bubblewrap) always, docker when a daemon
answers and the image is built (.ci/setup_sandbox.sh does both)."""

from __future__ import annotations

import shutil

import pytest

from miles_envs.sandbox import Limits, make_sandbox
from miles_envs.sandbox.docker_backend import docker_unavailable

# Small limits keep the bombs quick; the tests pass smaller ones where they probe a limit.
TEST_LIMITS = Limits(cpu_s=5, memory_mb=256, pids=32, file_mb=4, output_kb=16)


def local_unavailable() -> str | None:
    return None if shutil.which("bwrap") else "bubblewrap is not installed: apt-get install bubblewrap"


UNAVAILABLE = {"local": local_unavailable, "docker": docker_unavailable}


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request) -> str:
    reason = UNAVAILABLE[request.param]()
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
async def sandbox(backend):
    box = make_sandbox(backend, limits=TEST_LIMITS, timeout=5, workdir_mb=16)
    await box.start()
    yield box
    await box.close()
