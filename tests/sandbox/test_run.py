"""Behaviour of Sandbox.run and session() on every backend that can run here."""

from __future__ import annotations

import pytest

from miles_envs.sandbox import ExecResult, Limits, Sandbox


async def test_python_prints_and_exits(sandbox):
    result = await sandbox.run("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (result.stdout, result.stderr, result.exit_code, result.status) == ("out\n", "err\n", 3, "error")


async def test_exception_gives_traceback_and_exit_1(sandbox):
    result = await sandbox.run("raise ValueError('boom')")
    assert result.exit_code == 1
    assert "ValueError: boom" in result.stderr


async def test_bash_with_stdin(sandbox):
    result = await sandbox.run("read line; echo got:$line; exit 4", language="bash", stdin="hello\n")
    assert (result.stdout, result.exit_code) == ("got:hello\n", 4)


async def test_files_are_written_into_the_workdir(sandbox):
    result = await sandbox.run(
        "import os; print(os.getcwd(), open('data/a.txt').read(), open('b.bin','rb').read())",
        files={"data/a.txt": "alpha", "b.bin": b"\x00\x01"},
    )
    assert result.stdout == "/work alpha b'\\x00\\x01'\n"


async def test_file_path_leaving_the_workdir_is_refused(sandbox):
    result = await sandbox.run("print(1)", files={"../escape.txt": "x"})
    assert result.status == "sandbox_error"
    assert "leaves the workdir" in result.error


async def test_stateless_runs_share_nothing(sandbox):
    await sandbox.run("open('left.txt','w').write('x'); x = 1")
    result = await sandbox.run("import os; print(os.listdir('.'), 'x' in globals())")
    assert result.stdout == "[] False\n"


async def test_output_is_truncated_at_the_limit(sandbox):
    result = await sandbox.run("print('a' * 100_000)", limits=Limits(output_kb=1))
    assert result.output_truncated
    assert result.stdout == "a" * 1024


async def test_unknown_language_is_a_clear_error(sandbox):
    with pytest.raises(ValueError, match="python, bash"):
        await sandbox.run("1", language="ruby")


async def test_session_keeps_globals_and_files(sandbox):
    async with sandbox.session() as session:
        await session.run("x = 41\nopen('notes.txt', 'w').write('kept')")
        result = await session.run("print(x + 1, open('notes.txt').read())")
        listing = await session.run("ls", language="bash")
    assert result.stdout == "42 kept\n"
    assert listing.stdout == "notes.txt\n"
    after = await sandbox.run("import os; print(os.listdir('.'))")
    assert after.stdout == "[]\n"


async def test_session_survives_a_timeout_with_files_but_not_globals(sandbox):
    async with sandbox.session() as session:
        await session.run("y = 1\nopen('f', 'w').write('still here')")
        hung = await session.run("while True: pass", timeout=0.5)
        after = await session.run("print(open('f').read(), 'y' in globals())")
    assert hung.timed_out and "variables are lost" in hung.stderr
    assert after.stdout == "still here False\n"


async def test_run_inside_a_session_is_refused(sandbox):
    async with sandbox.session():
        with pytest.raises(RuntimeError, match="session object"):
            await sandbox.run("print(1)")


def test_backends_satisfy_the_protocol(sandbox):
    assert isinstance(sandbox, Sandbox)


def test_exec_result_status_words():
    assert ExecResult("", "", 0).status == "ok"
    assert ExecResult("", "", -9, timed_out=True).status == "timeout"
    assert ExecResult("", "", 137, oom_killed=True).status == "oom"
    assert ExecResult("", "", -11).status == "killed"
    assert ExecResult.failure("gone").status == "sandbox_error"
