"""Start an SGLang server as a child process, wait until it answers, and stop it cleanly.

``SGLangServerConfig.command()`` builds ``python -m sglang.launch_server`` with the flags an RL
rollout needs (routed experts, speculative decoding, LoRA). ``ServerProcess`` is the generic part:
it runs any HTTP server command in its own process group, polls a health URL, and on stop sends
SIGTERM to the whole group (SGLang forks scheduler and detokenizer processes), then SIGKILL.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx


class ServerStartError(RuntimeError):
    """The server process exited or did not become healthy in time; carries the log tail."""


@dataclass
class SGLangServerConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    context_length: int | None = None
    mem_fraction_static: float | None = None
    return_routed_experts: bool = False
    weight_version: str | None = None
    # speculative decoding, e.g. algorithm "EAGLE" or "NEXTN" (MTP layers as the draft)
    speculative_algorithm: str | None = None
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    # LoRA adapters served from the start: name -> path
    lora_paths: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int | None = None
    lora_target_modules: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, python: str = sys.executable) -> list[str]:
        cmd = [python, "-m", "sglang.launch_server", "--model-path", self.model_path]
        cmd += ["--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp_size)]
        options = {
            "--context-length": self.context_length,
            "--mem-fraction-static": self.mem_fraction_static,
            "--weight-version": self.weight_version,
            "--speculative-algorithm": self.speculative_algorithm,
            "--speculative-draft-model-path": self.speculative_draft_model_path,
            "--speculative-num-steps": self.speculative_num_steps,
            "--speculative-eagle-topk": self.speculative_eagle_topk,
            "--speculative-num-draft-tokens": self.speculative_num_draft_tokens,
            "--max-lora-rank": self.max_lora_rank,
        }
        for flag, value in options.items():
            if value is not None:
                cmd += [flag, str(value)]
        if self.return_routed_experts:
            cmd.append("--enable-return-routed-experts")
        if self.lora_paths:
            cmd += ["--enable-lora", "--lora-paths", *(f"{name}={path}" for name, path in self.lora_paths.items())]
        if self.lora_target_modules:
            cmd += ["--lora-target-modules", *self.lora_target_modules]
        return cmd + list(self.extra_args)


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


class ServerProcess:
    """One HTTP server child process with a health URL; a context manager that always stops it."""

    def __init__(self, command: list[str], health_url: str, *, log_path: str | Path | None = None) -> None:
        self.command = command
        self.health_url = health_url
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, *, timeout: float = 900.0, poll_interval: float = 0.5) -> ServerProcess:
        """Spawn the command and block until ``health_url`` answers 200."""
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ServerStartError(f"server exited with code {code} before becoming healthy{self._log_tail()}")
            if self._healthy():
                return self
            time.sleep(poll_interval)
        self.stop()
        raise ServerStartError(f"server not healthy at {self.health_url} after {timeout:g}s{self._log_tail()}")

    def stop(self, *, grace: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the exit code."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None
        return None if process is None else process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ServerProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last log lines of {self.log_path}:\n" + "\n".join(tail)


def launch_sglang(config: SGLangServerConfig, *, log_path: str | Path | None = None, timeout: float = 900.0) -> ServerProcess:
    """Start SGLang for ``config`` and wait for ``/health_generate`` (a real one-token generation)."""
    if not sglang_available():
        raise ServerStartError("sglang is not installed in this environment: pip install 'miles-envs[sglang]'")
    server = ServerProcess(config.command(), f"{config.base_url}/health_generate", log_path=log_path)
    return server.start(timeout=timeout)
