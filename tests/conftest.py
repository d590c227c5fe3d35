import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = REPO / "tests" / "gpu"


def pytest_ignore_collect(collection_path, config):
    """``pytest -m gpu`` collects tests/gpu alone (every GPU test lives there), so a GPU machine
    needs only the project's own dependencies and those tests' to collect it."""
    if config.getoption("markexpr") != "gpu":
        return None
    path = Path(collection_path).resolve()
    related = path == GPU_TESTS or GPU_TESTS in path.parents or path in GPU_TESTS.parents
    return None if related else True


@pytest.fixture
def miles_home(tmp_path, monkeypatch):
    """An isolated user store and working directory, so tests never touch the real config."""
    home = tmp_path / "home"
    monkeypatch.setenv("MILES_ENVS_HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    from miles_envs.registry import default_registry

    default_registry.reload()
    yield home
    default_registry.reload()


def run_cli(*args, cwd=None, env=None, check=True):
    """Run the real `miles-envs` console script in a fresh process."""
    exe = Path(sys.executable).with_name("miles-envs")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"miles-envs {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
