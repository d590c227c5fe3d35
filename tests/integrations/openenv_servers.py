"""Two small OpenEnv-native environments served by openenv-core's own FastAPI app on 127.0.0.1."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import uvicorn
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State


class TextAction(Action):
    message: str


class TextObservation(Observation):
    text: str = ""


class EchoEnvironment(Environment):
    """Echoes the message back; reward = its length; three steps per episode."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id="", step_count=0)

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> TextObservation:
        self._state = State(episode_id=episode_id or "echo", step_count=0)
        return TextObservation(text="Say something.")

    def step(self, action: TextAction, timeout_s: Optional[float] = None, **kwargs: Any) -> TextObservation:
        self._state.step_count += 1
        return TextObservation(text=f"echo: {action.message}", reward=float(len(action.message)), done=self._state.step_count >= 3)

    @property
    def state(self) -> State:
        return self._state


class GuessEnvironment(Environment):
    """Guess a seeded number in 1..9; reward 1 on a hit; five guesses."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id="", step_count=0)
        self._target = 0

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> TextObservation:
        self._target = random.Random(seed).randint(1, 9)
        self._state = State(episode_id=episode_id or "guess", step_count=0)
        return TextObservation(text="Guess a number from 1 to 9.")

    def step(self, action: TextAction, timeout_s: Optional[float] = None, **kwargs: Any) -> TextObservation:
        self._state.step_count += 1
        digits = [int(c) for c in action.message if c.isdigit()]
        guess = digits[-1] if digits else None
        hit = guess == self._target
        hint = "correct" if hit else "higher" if guess is None or guess < self._target else "lower"
        return TextObservation(text=hint, reward=1.0 if hit else 0.0, done=hit or self._state.step_count >= 5)

    @property
    def state(self) -> State:
        return self._state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(environment: type[Environment]) -> Iterator[str]:
    """Serve ``environment`` with openenv-core's app under uvicorn in a thread; yields the base URL."""
    app = create_app(environment, TextAction, TextObservation, max_concurrent_envs=8)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the OpenEnv test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
