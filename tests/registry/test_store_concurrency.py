import subprocess
import sys

from miles_envs.registry.store import Store

WRITER = """
import sys
from miles_envs.registry.store import Store
store = Store(sys.argv[1], "user")
worker = sys.argv[2]
for i in range(15):
    store.add(f"w{worker}/Env{i}-v0", {"entry_point": "miles_envs.envs.echo:EchoEnv", "kwargs": {"words": i + 1}})
"""


def test_eight_processes_lose_no_registration(tmp_path):
    path = tmp_path / "registry.toml"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)]) for w in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    envs = Store(path, "user").read()
    assert len(envs) == 8 * 15
    assert envs["w7/Env14-v0"]["kwargs"] == {"words": 15}
    assert not list(tmp_path.glob("*.tmp")), "no temp files left behind"


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    import pytest

    path = tmp_path / "registry.toml"
    store = Store(path, "user")
    store.add("a/One-v0", {"entry_point": "m:C"})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.add("a/Two-v0", {"entry_point": "m:C"})
    monkeypatch.undo()
    assert list(Store(path, "user").read()) == ["a/One-v0"]
    assert not list(tmp_path.glob("*.tmp"))
