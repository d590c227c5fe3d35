"""The e2b adapter. e2b's cloud cannot be reached here, so most tests drive the adapter through a
fake SDK object that records calls; the live test runs only when E2B_API_KEY is set."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from miles_envs.sandbox import Limits, make_sandbox


class FakeTimeout(Exception):
    pass


class FakeCommandExit(Exception):
    def __init__(self, stdout, stderr, exit_code):
        self.stdout, self.stderr, self.exit_code = stdout, stderr, exit_code


class FakeRemote:
    """Stands in for e2b_code_interpreter.AsyncSandbox: a dict of files and a scripted kernel."""

    created: list[FakeRemote] = []

    def __init__(self, **options):
        self.options = options
        self.written = {}
        self.killed = False
        self.files = SimpleNamespace(write=self._write)
        self.commands = SimpleNamespace(run=self._command)
        FakeRemote.created.append(self)

    @classmethod
    async def create(cls, **options):
        return cls(**options)

    async def _write(self, path, data):
        self.written[path] = data

    async def run_code(self, code, language, timeout):
        if code == "loop":
            raise FakeTimeout
        if code == "fail":
            error = SimpleNamespace(name="ZeroDivisionError", value="division by zero", traceback="")
            return SimpleNamespace(logs=SimpleNamespace(stdout=["partial\n"], stderr=[]), error=error)
        return SimpleNamespace(logs=SimpleNamespace(stdout=[f"ran {code}\n", "x" * 3000], stderr=[]), error=None)

    async def _command(self, cmd, cwd, timeout):
        if cmd == "false":
            raise FakeCommandExit("", "nope\n", 1)
        return SimpleNamespace(stdout=f"$ {cmd}\n", stderr="", exit_code=0)

    async def is_running(self):
        return not self.killed

    async def kill(self):
        self.killed = True


FAKE_SDK = SimpleNamespace(AsyncSandbox=FakeRemote, TimeoutException=FakeTimeout, CommandExitException=FakeCommandExit)


@pytest.fixture
def fake_e2b():
    FakeRemote.created.clear()
    return make_sandbox("e2b", api_key="test-key", sdk=FAKE_SDK, limits=Limits(output_kb=1))


async def test_fake_sdk_run_python_writes_files_truncates_and_kills(fake_e2b):
    result = await fake_e2b.run("1+1", files={"a.txt": "hi"})
    (remote,) = FakeRemote.created
    assert remote.options == {"api_key": "test-key"}
    assert remote.written == {"/home/user/a.txt": "hi"}
    assert result.stdout == ("ran 1+1\n" + "x" * 3000)[:1024]
    assert result.output_truncated and result.exit_code == 0
    assert remote.killed  # a stateless run leaves no sandbox behind


async def test_fake_sdk_errors_and_timeouts_map_to_exec_results(fake_e2b):
    failed = await fake_e2b.run("fail")
    assert (failed.exit_code, failed.stdout) == (1, "partial\n")
    assert failed.stderr == "ZeroDivisionError: division by zero\n"
    hung = await fake_e2b.run("loop")
    assert hung.status == "timeout"


async def test_fake_sdk_bash_uses_commands(fake_e2b):
    ok = await fake_e2b.run("ls", language="bash")
    bad = await fake_e2b.run("false", language="bash")
    assert (ok.stdout, ok.exit_code) == ("$ ls\n", 0)
    assert (bad.stderr, bad.exit_code) == ("nope\n", 1)


async def test_fake_sdk_session_keeps_one_remote(fake_e2b):
    async with fake_e2b.session() as session:
        await session.run("x = 1")
        await session.run("x")
    assert len(FakeRemote.created) == 1 and FakeRemote.created[0].killed


async def test_fake_sdk_refuses_stdin(fake_e2b):
    with pytest.raises(ValueError, match="files="):
        await fake_e2b.run("input()", stdin="x")


@pytest.mark.skipif(not os.environ.get("E2B_API_KEY"), reason="live e2b test needs E2B_API_KEY")
async def test_live_e2b_runs_code():
    box = make_sandbox("e2b")
    try:
        result = await box.run("print(6 * 7)")
    finally:
        await box.close()
    assert result.stdout == "42\n"
