"""Threads that run sync env methods (``reset``/``step``/``close``) for the async loop.

asyncio's default executor has a few workers per core, shared by every sync env of the process: a
``step()`` that hangs past the loop's timeout kept its worker, and a handful of those starved every
other sync env. Here each call gets an idle worker or a new one, so a hung call holds only its own
thread, and when the caller stops waiting (timeout or cancel) the call is interrupted with an
exception raised inside it; a call blocked inside C code (a socket read, ``time.sleep``) sees it
when that returns. Idle workers exit after ``idle_seconds``.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class CallAbandoned(BaseException):
    """Raised inside a sync env call whose caller stopped waiting for it."""


@dataclass
class _Job:
    call: Callable[[], Any]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def deliver() -> None:
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop closed while the call ran: nobody is waiting
            pass


class _Worker:
    def __init__(self, pool: SyncWorkers) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.job: _Job | None = None
        self.thread = threading.Thread(target=self._serve, name="miles-envs-sync-env", daemon=True)
        self.thread.start()

    def interrupt(self, job: _Job) -> None:
        with self.lock:
            if self.job is job:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident), ctypes.py_object(CallAbandoned))

    def _serve(self) -> None:
        while True:
            try:
                job = self.inbox.get(timeout=self.pool.idle_seconds)
            except queue.Empty:
                if self.pool._retire(self):
                    return
                continue  # taken just as it timed out: its job is on the way
            self._run(job)
            self.pool._release(self)

    def _run(self, job: _Job) -> None:
        with self.lock:
            self.job = job
        try:
            try:
                result = job.context.run(job.call)
            finally:
                with self.lock:  # after this no interrupt is sent; one sent before is raised here at the latest
                    self.job = None
        except CallAbandoned:
            return
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller, as asyncio.to_thread does
            job.settle(error=error)
        else:
            job.settle(result=result)


class SyncWorkers:
    def __init__(self, idle_seconds: float = 30.0) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``await asyncio.to_thread(fn, ...)`` on a worker of its own, interrupted if cancelled."""
        loop = asyncio.get_running_loop()
        job = _Job(functools.partial(fn, *args, **kwargs), contextvars.copy_context(), loop, loop.create_future())
        worker = self._take()
        worker.inbox.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            worker.interrupt(job)
            raise

    def idle_workers(self) -> int:
        """Workers waiting for a call (a hung call's worker is not among them)."""
        with self._lock:
            return len(self._idle)

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker(self)

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _retire(self, worker: _Worker) -> bool:
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False


sync_workers = SyncWorkers()
