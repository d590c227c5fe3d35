"""The README's walkthrough runs as written."""

import re
import shlex

from tests.conftest import REPO, run_cli


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_write_your_own_env_walkthrough(tmp_path):
    env_file = next(b for b in blocks("python") if b.startswith("# my_env.py"))
    (tmp_path / "my_env.py").write_text(env_file)
    env = {"MILES_ENVS_HOME": str(tmp_path / "home")}
    commands = next(b for b in blocks("bash") if "miles-envs register" in b)
    for line in commands.splitlines():
        args = shlex.split(line.split("#")[0])
        assert args[0] == "miles-envs"
        run_cli(*args[1:], cwd=tmp_path, env=env)
    listed = run_cli("list", "--tag", "demo", cwd=tmp_path, env=env).stdout
    assert "demo/Countdown-v0" in listed
