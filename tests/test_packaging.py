"""A built wheel installs the side folders inside ``miles_envs`` only, with its data files."""

import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_holds_the_namespaced_packages_and_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("miles_envs-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"miles_envs", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("engine.py", "agents/sglang.py", "registry/core.py", "sandbox/runner.py", "trainer/torch_backend.py",
                   "trainer/megatron/weights.py", "viewer/templates/viewer.js", "envs/data/search_corpus.jsonl"):
        assert f"miles_envs/{module}" in names, module

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import importlib.util as u, miles_envs.engine, miles_envs.agents.sglang, miles_envs.registry, miles_envs.sandbox, miles_envs.trainer;"
        "print(miles_envs.__file__.startswith(%r), [n for n in ('agents','registry','sandbox','trainer') if u.find_spec(n)])"
        % str(target)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "True []"
