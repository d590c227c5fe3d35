import json
import subprocess
import sys
import textwrap

from tests.conftest import run_cli

MY_ENV = textwrap.dedent(
    """
    from miles_envs import Env, user

    class MyEnv(Env):
        '''Counts to three.'''
        max_turns = 3

        def __init__(self, start=0):
            self.start = start

        def reset(self, seed=None, options=None):
            self.n = self.start
            return [user(f"n={self.n}")], {}

        def step(self, action):
            self.n += 1
            return [user(f"n={self.n}")], float(self.n), self.n >= self.start + 3, False, {}
    """
)


def test_register_list_check_then_make_in_new_process(tmp_path):
    env = {"MILES_ENVS_HOME": str(tmp_path / "home")}
    (tmp_path / "some_file.py").write_text(MY_ENV)
    run_cli("register", "some_file.py:MyEnv", "--id", "demo/My-v0", "--kwargs", '{"start": 1}', "--tag", "demo",
            cwd=tmp_path, env=env)
    listed = json.loads(run_cli("list", "--json", cwd=tmp_path, env=env).stdout)
    mine = [row for row in listed if row["id"] == "demo/My-v0"]
    assert mine and mine[0]["source"] == "user" and mine[0]["kwargs"] == {"start": 1}
    assert mine[0]["max_turns"] == 3  # the class's own max_turns, registered without --max-turns
    assert "close() idempotent" in run_cli("check", "demo/My-v0", cwd=tmp_path, env=env).stdout
    info = run_cli("info", "demo/My-v0", cwd=tmp_path, env=env).stdout
    assert "Counts to three." in info and "max turns: 3" in info

    code = textwrap.dedent(
        """
        import miles_envs, gymnasium
        env = miles_envs.make("demo/My-v0")
        print(env.reset(seed=0)[0][0]["content"])
        genv = gymnasium.make("miles_envs.gym:demo/My-v0")
        obs, info = genv.reset(seed=0)
        print(obs, genv.step("next")[:3])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["n=1", "n=1 ('n=2', 2.0, False)"]


def test_check_fails_readably_and_unknown_id_suggests(tmp_path):
    env = {"MILES_ENVS_HOME": str(tmp_path / "home")}
    (tmp_path / "broken.py").write_text(
        "from miles_envs import Env, user\n"
        "class Broken(Env):\n"
        "    max_turns = 2\n"
        "    def reset(self, seed=None, options=None): return [user('x')], {}\n"
        "    def step(self, action): return [user('y')], 0.0, False, {}\n"
    )
    run_cli("register", "broken.py:Broken", "--id", "demo/Broken-v0", cwd=tmp_path, env=env)
    result = run_cli("check", "demo/Broken-v0", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "FAIL" in result.stdout and "4-tuple" in result.stdout
    result = run_cli("check", "demo/Brokn-v0", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "did you mean: demo/Broken-v0" in result.stderr


def test_register_rejects_bad_input_fast(tmp_path):
    env = {"MILES_ENVS_HOME": str(tmp_path / "home")}
    result = run_cli("register", "nowhere.py:X", "--id", "demo/X-v0", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run_cli("register", "miles_envs.envs.echo:EchoEnv", "--id", "bad id", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "namespace/Name-v0" in result.stderr
    result = run_cli("register", "miles_envs.envs.echo:EchoEnv", "--id", "miles/Echo-v0", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "builtin" in result.stderr
