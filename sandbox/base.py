"""The sandbox contract shared by every backend: limits in, an ``ExecResult`` out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

Language = Literal["python", "bash"]
Files = Mapping[str, "str | bytes"]
LANGUAGES: tuple[str, ...] = ("python", "bash")


class SandboxError(RuntimeError):
    """The sandbox itself cannot be used (missing tool, image or credentials)."""


@dataclass(frozen=True)
class Limits:
    """Resources one execution may use. ``pids`` counts processes, ``file_mb`` the largest file."""

    cpu_s: float = 10.0
    memory_mb: int = 512
    pids: int = 64
    file_mb: int = 16
    output_kb: int = 64

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExecResult:
    """What one execution did. ``exit_code`` is negative (minus the signal) when a signal killed it;
    ``error`` is set when the sandbox itself failed rather than the code."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    oom_killed: bool = False
    duration: float = 0.0
    output_truncated: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def status(self) -> str:
        """One word for what happened: ok, error, timeout, oom, killed or sandbox_error."""
        if self.error is not None:
            return "sandbox_error"
        if self.timed_out:
            return "timeout"
        if self.oom_killed:
            return "oom"
        if self.exit_code < 0:
            return "killed"
        return "ok" if self.exit_code == 0 else "error"

    @classmethod
    def failure(cls, error: str, duration: float = 0.0, *, timed_out: bool = False) -> ExecResult:
        return cls(stdout="", stderr="", exit_code=-1, timed_out=timed_out, duration=duration, error=error)


class SandboxSession(Protocol):
    """A stateful conversation with one sandbox: files and interpreter globals persist between runs."""

    async def run(
        self,
        code: str,
        *,
        language: Language = "python",
        files: Files | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> ExecResult: ...


@runtime_checkable
class Sandbox(Protocol):
    """An isolated place to run untrusted code.

    ``run`` is stateless: each call starts from an empty workdir and leaves nothing behind.
    ``session()`` is an async context manager yielding a :class:`SandboxSession`; the sandbox is
    reset when it exits. ``start`` is optional (the first run starts the sandbox); ``close`` is
    idempotent.
    """

    backend: ClassVar[str]

    async def start(self) -> None: ...

    async def run(
        self,
        code: str,
        *,
        language: Language = "python",
        files: Files | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> ExecResult: ...

    def session(self) -> AbstractAsyncContextManager[SandboxSession]: ...

    async def reset(self) -> None: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


def check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; the sandbox runs {', '.join(LANGUAGES)}")


class SessionedSandbox:
    """The ``run``/``session`` plumbing every backend shares.

    A stateless ``run`` is refused while a session is open (it would wipe the session's files); a
    session starts the sandbox and resets it on exit. Backends implement ``start``, ``reset`` and
    ``_execute(code, language, files, stdin, timeout, limits, *, session)``.
    """

    _in_session = False

    async def run(
        self,
        code: str,
        *,
        language: Language = "python",
        files: Files | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> ExecResult:
        if self._in_session:
            raise RuntimeError("this sandbox is inside session(); run code through the session object")
        return await self._execute(code, language, files, stdin, timeout, limits, session=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[BoundSession]:
        if self._in_session:
            raise RuntimeError("this sandbox already has an open session")
        await self.start()
        self._in_session = True
        try:
            yield BoundSession(self)
        finally:
            self._in_session = False
            await self.reset()


class BoundSession:
    """A session's view of its sandbox: every run keeps the files and interpreter state."""

    def __init__(self, sandbox: SessionedSandbox) -> None:
        self.sandbox = sandbox

    async def run(
        self,
        code: str,
        *,
        language: Language = "python",
        files: Files | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> ExecResult:
        return await self.sandbox._execute(code, language, files, stdin, timeout, limits, session=True)
