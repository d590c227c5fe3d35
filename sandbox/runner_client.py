"""Host side of the in-sandbox runner: frames requests to it and turns replies into ExecResults.

Backends that host the runner (local bubblewrap, docker) subclass :class:`RunnerSandbox` and only
say how to start the runner and how to kill everything it contains.
"""

from __future__ import annotations

import asyncio
import marshal
import struct
import time
from pathlib import Path
from typing import Any, ClassVar

from miles_envs.sandbox.base import ExecResult, Files, Limits, SandboxError, SessionedSandbox, check_language

RUNNER_SOURCE = (Path(__file__).with_name("runner.py")).read_text()
HEADER = struct.Struct(">I")
MARSHAL_VERSION = 4  # the runner may be another Python version; format 4 is read by all of 3.4+
# Extra seconds the host waits beyond the execution timeout before it declares the runner hung.
REPLY_GRACE_S = 5.0


class RunnerChannel:
    """Length-prefixed ``marshal`` frames (format 4, plain data only) over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        data = marshal.dumps(message, MARSHAL_VERSION)
        self.writer.write(HEADER.pack(len(data)) + data)
        await self.writer.drain()
        return await self.receive()

    async def receive(self) -> dict[str, Any]:
        (size,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return marshal.loads(await self.reader.readexactly(size))


def encode_files(files: Files | None) -> dict[str, bytes]:
    return {name: data.encode() if isinstance(data, str) else bytes(data) for name, data in (files or {}).items()}


class RunnerSandbox(SessionedSandbox):
    """A sandbox whose inside is the runner: one warm interpreter, one request at a time."""

    backend: ClassVar[str] = ""
    startup_timeout_s: ClassVar[float] = 30.0

    def __init__(self, *, limits: Limits | None = None, timeout: float = 10.0) -> None:
        self.limits = limits or Limits()
        self.timeout = timeout
        self._channel: RunnerChannel | None = None
        self._lock = asyncio.Lock()

    # -- what a backend provides ----------------------------------------------------------------
    async def _spawn(self) -> RunnerChannel:
        """Start the sandbox with the runner inside; return the channel to it."""
        raise NotImplementedError

    async def _destroy(self) -> None:
        """Kill everything in the sandbox and release it. Must be idempotent."""
        raise NotImplementedError

    async def _diagnostics(self) -> str:
        """What the sandbox wrote to stderr, for error messages after the runner died."""
        return ""

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._channel is not None

    async def start(self) -> None:
        if self._channel is not None:
            return
        try:
            channel = await asyncio.wait_for(self._spawn(), self.startup_timeout_s)
            hello = await asyncio.wait_for(channel.receive(), self.startup_timeout_s)
        except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError) as e:
            detail = await self._diagnostics()
            await self._destroy()
            raise SandboxError(f"{self.backend} sandbox failed to start ({type(e).__name__}): {detail}") from e
        if not hello.get("ready"):
            await self._destroy()
            raise SandboxError(f"{self.backend} sandbox runner sent {hello!r} instead of its ready signal")
        self._channel = channel

    async def close(self) -> None:
        self._channel = None
        await self._destroy()

    async def healthy(self) -> bool:
        if self._channel is None:
            return False
        try:
            async with self._lock:
                reply = await asyncio.wait_for(self._channel.request({"op": "ping"}), REPLY_GRACE_S)
            return bool(reply.get("ok"))
        except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError):
            await self.close()
            return False

    async def reset(self) -> None:
        """Kill leftover processes, drop session state, wipe the workdir."""
        if self._channel is None:
            return
        async with self._lock:
            try:
                await asyncio.wait_for(self._channel.request({"op": "reset"}), REPLY_GRACE_S)
            except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError):
                await self.close()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- execution ------------------------------------------------------------------------------
    async def _execute(
        self,
        code: str,
        language: str,
        files: Files | None,
        stdin: str | None,
        timeout: float | None,
        limits: Limits | None,
        *,
        session: bool,
    ) -> ExecResult:
        check_language(language)
        timeout = self.timeout if timeout is None else timeout
        request = {
            "op": "run",
            "code": code,
            "language": language,
            "files": encode_files(files),
            "stdin": stdin or "",
            "timeout": timeout,
            "limits": self._wire_limits(limits or self.limits),
            "session": session,
        }
        await self.start()
        started = time.monotonic()
        async with self._lock:
            assert self._channel is not None
            try:
                reply = await asyncio.wait_for(self._channel.request(request), timeout + REPLY_GRACE_S)
            except asyncio.TimeoutError:
                await self.close()
                return ExecResult.failure(
                    f"{self.backend} sandbox stopped answering; it was destroyed",
                    time.monotonic() - started,
                    timed_out=True,
                )
            except (asyncio.IncompleteReadError, OSError):
                detail = await self._diagnostics()
                await self.close()
                return ExecResult.failure(
                    f"{self.backend} sandbox runner died; it was destroyed. {detail}".strip(),
                    time.monotonic() - started,
                )
        if "error" in reply:
            return ExecResult.failure(reply["error"], time.monotonic() - started)
        return ExecResult(**reply)

    def _wire_limits(self, limits: Limits) -> dict[str, Any]:
        return limits.to_wire()
