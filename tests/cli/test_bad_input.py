"""Every bad input to the registry, model, view, index, bench and serve commands: a non-zero exit, a message
that names the problem, no traceback, and nothing written or changed on disk.

Each case runs the real console script in a fresh process inside one shared workspace, which is
snapshotted (every path, size and mtime) before and after the case. The light install is the same
script with the optional dependency's import blocked, as if it were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from miles_envs.trajectory import Status, Trajectory
from miles_envs.trajectory_io import write_parquet

MY_ENV = textwrap.dedent(
    """
    from miles_envs import Env, user

    class Counter(Env):
        max_turns = 3

        def __init__(self, start=0):
            self.start = start

        def reset(self, seed=None, options=None):
            return [user(str(self.start))], {}

        def step(self, action):
            return [], 1.0, True, False, {}

    def helper():
        return 1
    """
)
STORE = """
[envs."demo/Stale-v0"]
entry_point = "{root}/my_env.py:Counter"
kwargs = {{ begin = 1 }}

[envs."demo/Gone-v0"]
entry_point = "{root}/gone.py:Gone"
"""
UNROUTABLE_HUB = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://10.255.255.1:9", "MILES_ENVS_TOKENIZERS": "/nonexistent"}


@dataclass
class Case:
    argv: list[str]
    says: list[str]  # fragments the output must contain (case-insensitive)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."
    blocked: tuple[str, ...] = ()  # import names made unavailable: the light install


def case(kind: str, command: str, *argv: str, says: str | list[str], **options) -> pytest.param:
    fragments = [says] if isinstance(says, str) else says
    return pytest.param(Case(list(argv), fragments, **options), id=f"{command}-{kind}-{'-'.join(fragments)[:40]}")


CASES = [
    # register
    case("missing", "register", "register", says="Missing argument"),
    case("missing", "register", "register", "my_env.py:Counter", says="Missing option '--id'"),
    case("wrong-typed", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--kwargs", "[1]", says="must be a JSON object"),
    case("wrong-typed", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--kwargs", "{start: 1}", says="not valid JSON"),
    case("wrong-typed", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--max-turns", "many", says="--max-turns"),
    case("wrong-typed", "register", "register", "my_env.py:helper", "--id", "demo/A-v0", says="not a miles_envs.Env subclass"),
    case("wrong-typed", "register", "register", "json:dumps", "--id", "demo/A-v0", says="not a miles_envs.Env subclass"),
    case("wrong-typed", "register", "register", "my_env", "--id", "demo/A-v0", says="path/to/file.py:Class"),
    case("wrong-typed", "register", "register", "my_env.py:Counter", "--id", "Counter", says="namespace/Name-v0"),
    case("missing", "register", "register", "absent.py:Counter", "--id", "demo/A-v0", says="does not exist"),
    case("missing", "register", "register", "my_env.py:Nope", "--id", "demo/A-v0", says=["has no attribute", "Counter"]),
    case("out-of-range", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--max-turns", "0", says="--max-turns"),
    case("conflicting", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--kwargs", '{"stop": 1}',
         says=["does not accept", "start"]),
    case("conflicting", "register", "register", "my_env.py:Counter", "--id", "miles/Echo-v0", says="builtin"),
    case("conflicting", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", "--scope", "galaxy", says="unknown scope"),
    case("unwritable", "register", "register", "my_env.py:Counter", "--id", "demo/A-v0", env={"MILES_ENVS_HOME": "afile/home"},
         says="cannot write the user registry"),
    # unregister
    case("missing", "unregister", "unregister", says="Missing argument"),
    case("out-of-range", "unregister", "unregister", "demo/Never-v0", says="not registered"),
    case("conflicting", "unregister", "unregister", "demo/Stale-v0", "--scope", "galaxy", says="unknown scope"),
    case("unwritable", "unregister", "unregister", "demo/A-v0", env={"MILES_ENVS_HOME": "afile/home"}, says="cannot write"),
    # list
    case("missing", "list", "list", "--tag", says="requires an argument"),
    case("wrong-typed", "list", "list", cwd="broken", says="not valid TOML"),
    # info
    case("missing", "info", "info", says="Missing argument"),
    case("out-of-range", "info", "info", "miles/GuessNumbr-v0", says="did you mean: miles/GuessNumber-v0, miles/GuessNumber7-v0?"),
    case("wrong-typed", "info", "info", "GuessNumber", says="did you mean: miles/GuessNumber-v0, miles/GuessNumber7-v0?"),
    case("conflicting", "info", "info", "demo/Stale-v0", says=["does not accept", "may be stale", "--override"]),
    case("missing", "info", "info", "demo/Gone-v0", says=["does not exist", "may be stale"]),
    # check
    case("missing", "check", "check", says="Missing argument"),
    case("wrong-typed", "check", "check", "miles/Echo-v0", "--kwargs", "{", says="not valid JSON"),
    case("wrong-typed", "check", "check", "miles/Echo-v0", "--kwargs", "[]", says="must be a JSON object"),
    case("wrong-typed", "check", "check", "miles/Echo-v0", "--seed", "first", says="--seed"),
    case("conflicting", "check", "check", "miles/Echo-v0", "--kwargs", '{"colour": 1}', says="does not accept"),
    case("out-of-range", "check", "check", "miles/Ech-v0", says="did you mean: miles/Echo-v0?"),
    # init-model
    case("missing", "init-model", "init-model", says="Missing argument"),
    case("wrong-typed", "init-model", "init-model", "m", "--arch", "gpt5", says="--arch 'gpt5'"),
    case("wrong-typed", "init-model", "init-model", "m", "--context", "long", says="--context"),
    case("out-of-range", "init-model", "init-model", "m", "--mtp", "-1", says="--mtp"),
    case("unwritable", "init-model", "init-model", "afile", says=["is a file", "--force"]),
    case("unwritable", "init-model", "init-model", "afile/m", says="is a file, not a folder"),
    case("unwritable", "init-model", "init-model", "/proc/m", says="cannot write under /proc"),
    case("conflicting", "init-model", "init-model", "full", says=["not empty", "--force"]),
    case("conflicting", "init-model", "init-model", ".", "--force", says="holds the working directory"),
    case("conflicting", "init-model", "init-model", "..", "--force", cwd="full", says="holds the working directory"),
    case("missing", "init-model", "init-model", "m", blocked=("torch",), says="pip install 'miles-envs[embedded]'"),
    # serve-engine
    case("missing", "serve-engine", "serve-engine", says="Missing argument"),
    case("missing", "serve-engine", "serve-engine", "absent", says=["does not exist", "init-model"]),
    case("wrong-typed", "serve-engine", "serve-engine", "full", says="no config.json"),
    case("wrong-typed", "serve-engine", "serve-engine", "model", "--device", "tpu", says="--device 'tpu'"),
    case("out-of-range", "serve-engine", "serve-engine", "model", "--port", "70000", says="--port"),
    case("out-of-range", "serve-engine", "serve-engine", "model", "--max-running", "0", says="--max-running"),
    case("missing", "serve-engine", "serve-engine", "model", blocked=("torch",), says="pip install 'miles-envs[embedded]'"),
    # serve-session
    case("missing", "serve-session", "serve-session", says="Missing option"),
    case("missing", "serve-session", "serve-session", "--engine", "embedded:absent", says=["does not exist", "init-model"]),
    case("out-of-range", "serve-session", "serve-session", "--engine", "scripted", "--port", "99999", says="--port"),
    case("missing", "serve-session", "serve-session", "--engine", "scripted", blocked=("starlette",),
         says="pip install 'miles-envs[serve]'"),
    # view
    case("missing", "view", "view", says="Missing argument"),
    case("missing", "view", "view", "absent.jsonl", says="no trajectory file"),
    case("wrong-typed", "view", "view", "corpus.jsonl", says="not a trajectory file"),
    case("wrong-typed", "view", "view", "run.jsonl", "--tokenizer", "gpt9", env=UNROUTABLE_HUB, says="neither a known name"),
    case("wrong-typed", "view", "view", "run.jsonl", "--tokenizer", "full", says="no tokenizer files"),
    case("unwritable", "view", "view", "run.jsonl", "-o", "/proc/page.html", says="cannot write under /proc"),
    case("unwritable", "view", "view", "run.jsonl", "-o", "afile/page.html", says="is a file, not a folder"),
    case("unwritable", "view", "view", "run.jsonl", "-o", "full", says="is a folder"),
    case("conflicting", "view", "view", "run.jsonl", "-o", "run.jsonl", says="the trajectory file itself"),
    case("missing", "view", "view", "run.jsonl", "--tokenizer", "qwen3", blocked=("transformers",),
         says="pip install 'miles-envs[tokenizers]'"),
    case("missing", "view", "view", "run.parquet", blocked=("pyarrow",), says="pip install 'miles-envs[parquet]'"),
    # index build / query / serve
    case("missing", "index-build", "index", "build", "corpus.jsonl", says="Missing option"),
    case("missing", "index-build", "index", "build", "absent.jsonl", "-o", "idx", says="does not exist"),
    case("wrong-typed", "index-build", "index", "build", "bad.jsonl", "-o", "idx", says="each line must be a JSON object"),
    case("unwritable", "index-build", "index", "build", "corpus.jsonl", "-o", "afile", says="is a file"),
    case("unwritable", "index-build", "index", "build", "corpus.jsonl", "-o", "/proc/idx", says="cannot write under /proc"),
    case("conflicting", "index-build", "index", "build", "corpus.jsonl", "-o", "full", says=["not empty", "--force"]),
    case("conflicting", "index-build", "index", "build", "corpus.jsonl", "-o", ".", "--force", says="holds the corpus"),
    case("missing", "index-build", "index", "build", "corpus.jsonl", "-o", "idx", blocked=("bm25s",),
         says="pip install 'miles-envs[search]'"),
    case("missing", "index-query", "index", "query", "full", says="Missing argument"),
    case("missing", "index-query", "index", "query", "absent", "paris", says="not a folder"),
    case("wrong-typed", "index-query", "index", "query", "full", "paris", says="no manifest.json"),
    case("out-of-range", "index-query", "index", "query", "full", "paris", "-k", "0", says="-k"),
    case("wrong-typed", "index-serve", "index", "serve", "full", says="no manifest.json"),
    case("out-of-range", "index-serve", "index", "serve", "full", "--port", "-1", says="--port"),
    # bench (each case fails before any bench script would start)
    case("out-of-range", "bench", "bench", "--only", "sandboxx", says="did you mean sandbox"),
    case("out-of-range", "bench", "bench", "--timeout", "0", says="--timeout"),
    case("wrong-typed", "bench", "bench", "--timeout", "soon", says="--timeout"),
    case("unwritable", "bench", "bench", "--stored", "--markdown", "/proc/perf.md", says="cannot write under /proc"),
    case("unwritable", "bench", "bench", "--results", "afile", says="is a file"),
    case("missing", "bench", "bench", "--stored", "--results", "absent", says="no results folder"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("something already here\n")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}\n")
    (root / "my_env.py").write_text(MY_ENV)
    (root / "corpus.jsonl").write_text('{"id": "1", "title": "Paris", "text": "Paris is in France."}\n')
    (root / "bad.jsonl").write_text("5\n")
    episode = Trajectory(prompt_ids=[1, 2], response_ids=[3], loss_mask=[1], logprobs=[-0.5], status=Status.COMPLETED, env_id="demo/A-v0")
    (root / "run.jsonl").write_text(episode.to_json() + "\n")
    write_parquet([episode], root / "run.parquet")
    (root / "home").mkdir()
    (root / "home" / "registry.toml").write_text(STORE.format(root=root))
    (root / "broken").mkdir()
    (root / "broken" / "miles-envs.toml").write_text("[envs\nnot toml\n")
    return root


def flat(text: str) -> str:
    """Lower-cased words: rich wraps long lines and boxes usage errors."""
    return " ".join(text.replace("│", " ").split()).lower()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run(case: Case, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MILES_ENVS_HOME": str(root / "home"), "COLUMNS": "200", **case.env}
    block = "".join(f"sys.modules[{name!r}] = None; " for name in case.blocked)  # import now raises ModuleNotFoundError
    code = f"import sys; {block}sys.argv = ['miles-envs', *sys.argv[1:]]; from miles_envs.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *case.argv], capture_output=True, text=True,
                          cwd=root / case.cwd, env=env, timeout=300)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_fails_cleanly(bad: Case, workspace: Path):
    before = snapshot(workspace)
    result = run(bad, workspace)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in bad.says:
        assert flat(fragment) in flat(output), output
    assert snapshot(workspace) == before, "the failed command wrote or changed files"
