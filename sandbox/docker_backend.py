"""The ``docker`` backend: one long-lived container per sandbox with the runner inside, attached
over the docker API's hijacked socket (no CLI, no exec per call).

The container has no network, memory (no swap), pids and CPU limits, a read-only root with tmpfs
``/work`` and ``/tmp``, runs as nobody with every capability dropped and ``no-new-privileges``,
and an init process so the runner can kill whatever the code leaves behind. Containers are labelled
with the run id and host, so the reaper removes those of a run that died without closing them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, ClassVar

from miles_envs.sandbox.base import Limits, SandboxError
from miles_envs.sandbox.docker_client import docker_client
from miles_envs.sandbox.reaper import (
    HOST_LABEL,
    RUN_LABEL,
    SANDBOX_LABEL,
    STATE_LABEL,
    current_run,
    reap_once,
    state_dir,
)
from miles_envs.sandbox.runner_client import RUNNER_SOURCE, RunnerChannel, RunnerSandbox

DEFAULT_IMAGE = "miles-envs-sandbox:latest"
BUILD_HINT = "build it with scripts/build_sandbox_image.sh (needs debootstrap and a running dockerd)"
# docker multiplexes stdout and stderr on an attached socket: 1 byte stream, 3 pad, 4 size.
MUX_HEADER = struct.Struct(">BxxxI")


def docker_unavailable(image: str = DEFAULT_IMAGE) -> str | None:
    """Why this machine cannot start docker sandboxes (None when it can), for callers that skip the backend."""
    try:
        client = docker_client()
    except SandboxError as e:
        return str(e)
    try:
        client.images.get(image)
    except Exception:
        return f"docker image {image} is not built: {BUILD_HINT}"
    return None


class _DemuxedStdout:
    """Feeds a StreamReader with the stdout stream of docker's multiplexed socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stdout = asyncio.StreamReader()
        self.stderr = bytearray()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        try:
            while True:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= MUX_HEADER.size:
                    stream, size = MUX_HEADER.unpack_from(buffer)
                    if len(buffer) < MUX_HEADER.size + size:
                        break
                    payload = buffer[MUX_HEADER.size : MUX_HEADER.size + size]
                    buffer = buffer[MUX_HEADER.size + size :]
                    if stream == 2:
                        self.stderr += payload[-4096:]
                    else:
                        self.stdout.feed_data(payload)
        except OSError:
            pass
        finally:
            self.stdout.feed_eof()


class _SocketWriter:
    """The write half of RunnerChannel over a raw non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def write(self, data: bytes) -> None:
        self.pending += data

    async def drain(self) -> None:
        data, self.pending = self.pending, b""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)


class DockerSandbox(RunnerSandbox):
    """Runs code in a locked-down container. See the module docstring for the settings."""

    backend: ClassVar[str] = "docker"

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        timeout: float = 10.0,
        image: str = DEFAULT_IMAGE,
        cpus: float = 1.0,
        workdir_mb: int = 64,
        python: str = "/usr/bin/python3",
        client: Any = None,
    ) -> None:
        super().__init__(limits=limits, timeout=timeout)
        self.client = docker_client(client)
        self.image = image
        self.cpus = cpus
        self.workdir_mb = workdir_mb
        self.python = python
        self._container: Any = None
        self._socket: socket.socket | None = None
        self._demux: _DemuxedStdout | None = None
        self._creating: asyncio.Future | None = None
        reap_once(self.backend, self.client)

    def container_options(self) -> dict[str, Any]:
        tmpfs = f"rw,nosuid,nodev,size={self.workdir_mb}m,mode=1777"
        memory = f"{self.limits.memory_mb + 64}m"  # room for the runner beside the code's limit
        return {
            "command": [self.python, "-I", "-S", "-c", RUNNER_SOURCE],
            "stdin_open": True,
            "detach": True,
            "init": True,
            "user": "65534:65534",
            "working_dir": "/work",
            "environment": {"HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/work": tmpfs, "/tmp": tmpfs},
            "mem_limit": memory,
            "memswap_limit": memory,
            "pids_limit": self.limits.pids + 4,
            "nano_cpus": int(self.cpus * 1e9),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "ipc_mode": "none",
            "labels": {
                SANDBOX_LABEL: "1",
                RUN_LABEL: current_run().id,
                STATE_LABEL: str(state_dir()),
                HOST_LABEL: socket.gethostname(),
            },
        }

    def _create_and_attach(self) -> socket.socket:
        import docker

        try:
            self._container = self.client.containers.create(self.image, **self.container_options())
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"docker image {self.image} not found; {BUILD_HINT}") from e
        hijacked = self.client.api.attach_socket(
            self._container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        self._container.start()
        raw = hijacked._sock  # the SDK wraps the socket in a blocking SocketIO; asyncio needs the socket
        raw.setblocking(False)
        return raw

    async def _spawn(self) -> RunnerChannel:
        # Shielded: a start cancelled mid-creation must not orphan the container the thread makes;
        # _destroy waits for the thread and removes it.
        self._creating = asyncio.ensure_future(asyncio.to_thread(self._create_and_attach))
        self._socket = await asyncio.shield(self._creating)
        self._demux = _DemuxedStdout(self._socket)
        return RunnerChannel(self._demux.stdout, _SocketWriter(self._socket))

    async def _destroy(self) -> None:
        creating, self._creating = self._creating, None
        if creating is not None:
            await asyncio.wait([creating])
            if not creating.cancelled() and creating.exception() is None and creating.result() is not self._socket:
                creating.result().close()
        container, self._container = self._container, None
        sock, self._socket = self._socket, None
        demux, self._demux = self._demux, None
        if demux is not None:
            demux.task.cancel()
        if sock is not None:
            sock.close()
        if container is not None:
            await asyncio.to_thread(self._remove, container)

    @staticmethod
    def _remove(container: Any) -> None:
        import docker

        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass

    async def _diagnostics(self) -> str:
        if self._demux is None:
            return ""
        return bytes(self._demux.stderr).decode("utf-8", "replace").strip()

    def _wire_limits(self, limits: Limits) -> dict[str, Any]:
        # The container's pids cgroup bounds processes; RLIMIT_NPROC would count every uid-65534
        # process on the host, other sandboxes included.
        return dict(limits.to_wire(), pids_rlimit=False)
