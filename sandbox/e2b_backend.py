"""The ``e2b`` backend: a cloud code-interpreter sandbox through the e2b SDK.

e2b sandboxes are remote microVMs whose limits are set by the template, so ``Limits`` only bounds
the output kept here. A stateless ``run`` resets the interpreter context afterwards; ``session()``
keeps it (the code interpreter is a Jupyter kernel, stateful by nature).
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any, ClassVar

from miles_envs.sandbox.base import ExecResult, Files, Limits, SandboxError, SessionedSandbox, check_language

WORKDIR = "/home/user"


def _truncate(text: str, limit_kb: int) -> tuple[str, bool]:
    limit = limit_kb * 1024
    data = text.encode()
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", "ignore"), True


class E2BSandbox(SessionedSandbox):
    """One e2b code-interpreter sandbox. ``sdk`` is the module providing ``AsyncSandbox``
    (default: ``e2b_code_interpreter``); the API key comes from ``api_key`` or ``$E2B_API_KEY``."""

    backend: ClassVar[str] = "e2b"

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        timeout: float = 10.0,
        api_key: str | None = None,
        template: str | None = None,
        sdk: ModuleType | Any = None,
    ) -> None:
        self.limits = limits or Limits()
        self.timeout = timeout
        self.api_key = api_key or os.environ.get("E2B_API_KEY")
        self.template = template
        self.sdk = sdk or self._import_sdk()
        if not self.api_key:
            raise SandboxError("the e2b backend needs an API key: set E2B_API_KEY or pass api_key=")
        self._remote: Any = None

    @staticmethod
    def _import_sdk() -> ModuleType:
        try:
            import e2b_code_interpreter
        except ImportError as e:
            raise SandboxError("the e2b backend needs its SDK: pip install 'miles-envs[e2b]'") from e
        return e2b_code_interpreter

    @property
    def started(self) -> bool:
        return self._remote is not None

    async def start(self) -> None:
        if self._remote is None:
            options = {"template": self.template} if self.template else {}
            self._remote = await self.sdk.AsyncSandbox.create(api_key=self.api_key, **options)

    async def close(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.kill()

    async def healthy(self) -> bool:
        return self._remote is not None and bool(await self._remote.is_running())

    async def reset(self) -> None:
        """A fresh sandbox: e2b offers no cheaper way to drop files and kernel state together."""
        await self.close()

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        """Stateless: each run ends with a fresh cloud sandbox (see ``reset``)."""
        try:
            return await super().run(code, **kwargs)
        finally:
            if not self._in_session:
                await self.reset()

    async def _execute(
        self,
        code: str,
        language: str,
        files: Files | None,
        stdin: str | None,
        timeout: float | None,
        limits: Limits | None,
        *,
        session: bool = False,  # e2b keeps kernel state either way; stateless runs reset afterwards
    ) -> ExecResult:
        check_language(language)
        if stdin:
            raise ValueError("the e2b backend cannot feed stdin; write the input to a file with files=")
        timeout = self.timeout if timeout is None else timeout
        limits = limits or self.limits
        await self.start()
        for name, data in (files or {}).items():
            await self._remote.files.write(f"{WORKDIR}/{name}", data)
        started = time.monotonic()
        try:
            if language == "bash":
                stdout, stderr, exit_code = await self._run_command(code, timeout)
            else:
                stdout, stderr, exit_code = await self._run_code(code, timeout)
        except self.sdk.TimeoutException:
            return ExecResult("", "", -9, timed_out=True, duration=time.monotonic() - started)
        stdout, cut_out = _truncate(stdout, limits.output_kb)
        stderr, cut_err = _truncate(stderr, limits.output_kb)
        return ExecResult(
            stdout, stderr, exit_code, duration=time.monotonic() - started, output_truncated=cut_out or cut_err
        )

    async def _run_code(self, code: str, timeout: float) -> tuple[str, str, int]:
        execution = await self._remote.run_code(code, language="python", timeout=timeout)
        stdout = "".join(execution.logs.stdout)
        stderr = "".join(execution.logs.stderr)
        if execution.error is None:
            return stdout, stderr, 0
        return stdout, stderr + f"{execution.error.name}: {execution.error.value}\n", 1

    async def _run_command(self, command: str, timeout: float) -> tuple[str, str, int]:
        try:
            result = await self._remote.commands.run(command, cwd=WORKDIR, timeout=timeout)
        except self.sdk.CommandExitException as e:
            result = e
        return result.stdout, result.stderr, result.exit_code
