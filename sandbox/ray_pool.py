"""A sandbox pool spread over the nodes of a Ray cluster, with the SandboxPool API.

Each node gets one actor pinned to it that holds that node's own :class:`SandboxPool` (``local``
bubblewrap or ``docker``), so sandboxes start and run where the actor lives and only code and
results cross the network. Calls go to the live node with the least load (calls in flight plus
sessions open). When a node dies (its actor dies with it, or a call runs past its timeout plus a
grace and a ping then goes unanswered for the grace) it is dropped: a stateless ``run`` is retried
on another node, a session on it fails cleanly (its runs return a sandbox error saying the state is
lost) and new sessions go elsewhere. A call to a dead node ends within its timeout plus twice the
grace, so a lost node never hangs an episode; a call queued on a busy node waits as long as the
node answers pings.

    pool = RaySandboxPool("local", size_per_node=8)   # ray.init(...) first
    await pool.start()
    result = await pool.run("print(1)")
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from miles_envs.sandbox.base import ExecResult, SandboxError

# Seconds a call may take beyond its execution timeout before its node counts as lost.
CALL_GRACE_S = 15.0


class SandboxNode:
    """The actor on one node: that node's SandboxPool and the sessions open on it."""

    def __init__(self, backend: str, size: int, pool_kwargs: dict[str, Any]) -> None:
        from miles_envs.sandbox.pool import SandboxPool

        self.pool = SandboxPool(backend, size=size, **pool_kwargs)
        self.sessions: dict[int, tuple[AsyncExitStack, Any]] = {}
        self._ids = itertools.count()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def run(self, code: str, kwargs: dict[str, Any]) -> ExecResult:
        return await self.pool.run(code, **kwargs)

    async def open_session(self) -> int:
        stack = AsyncExitStack()
        session = await stack.enter_async_context(self.pool.session())
        session_id = next(self._ids)
        self.sessions[session_id] = (stack, session)
        return session_id

    async def session_run(self, session_id: int, code: str, kwargs: dict[str, Any]) -> ExecResult:
        return await self.sessions[session_id][1].run(code, **kwargs)

    async def close_session(self, session_id: int) -> None:
        stack, _ = self.sessions.pop(session_id, (None, None))
        if stack is not None:
            await stack.aclose()

    def metrics(self) -> dict[str, Any]:
        return {**self.pool.metrics(), "open_sessions": len(self.sessions)}

    async def close(self) -> None:
        for session_id in list(self.sessions):
            await self.close_session(session_id)
        await self.pool.close()


class _Node:
    def __init__(self, node_id: str, actor: Any) -> None:
        self.id = node_id
        self.actor = actor
        self.in_flight = 0
        self.sessions = 0
        self.alive = True

    @property
    def load(self) -> int:
        return self.in_flight + self.sessions


class NodeLost(Exception):
    """The node holding a call died or stopped answering."""


class RaySandboxPool:
    """Sandboxes on every live node of the connected Ray cluster (or the ``nodes`` given by id).

    ``size_per_node`` warm sandboxes per node; other keyword arguments go to each node's
    SandboxPool (``max_starting``, ``limits``, ``timeout``, ...). ``stats`` counts the calls each
    node served.
    """

    def __init__(self, backend: str = "local", *, size_per_node: int = 8, nodes: list[str] | None = None,
                 timeout: float = 10.0, call_grace_s: float = CALL_GRACE_S, **pool_kwargs: Any) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as error:
            raise SandboxError("RaySandboxPool needs ray: pip install 'miles-envs[ray]'") from error
        self.backend = backend
        self.size_per_node = size_per_node
        self.node_ids = nodes
        self.timeout = timeout
        self.call_grace_s = call_grace_s
        self.pool_kwargs = {**pool_kwargs, "timeout": timeout}
        self.nodes: list[_Node] = []
        self.stats: Counter[str] = Counter()
        self.lost: list[str] = []
        self._turns = itertools.count()

    @property
    def live_nodes(self) -> list[str]:
        return [node.id for node in self.nodes if node.alive]

    async def start(self) -> None:
        """Place one actor on each node and wait until all answer."""
        if self.nodes:
            return
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            raise SandboxError("RaySandboxPool needs a Ray connection: call ray.init(address=...) first")
        node_ids = self.node_ids or [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        actor_class = ray.remote(SandboxNode)
        for node_id in node_ids:
            actor = actor_class.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                num_cpus=0,
                max_concurrency=10_000,
                max_restarts=0,
            ).remote(self.backend, self.size_per_node, self.pool_kwargs)
            self.nodes.append(_Node(node_id, actor))
        placed = await asyncio.gather(*(self._call(node, "node_id", timeout=120.0) for node in self.nodes))
        for node, where in zip(self.nodes, placed):
            if where != node.id:
                raise SandboxError(f"sandbox actor for node {node.id} was placed on {where}")

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        """A stateless run on the least busy live node; retried elsewhere if that node dies."""
        await self.start()
        while True:
            node = self._pick()
            if node is None:
                return ExecResult.failure(f"no live sandbox node left (lost: {', '.join(self.lost)})")
            try:
                return await self._call(node, "run", code, kwargs, timeout=kwargs.get("timeout"))
            except NodeLost:
                continue

    @asynccontextmanager
    async def session(self) -> AsyncIterator[RaySession]:
        """A stateful session on one node. If that node dies, its runs return a sandbox error."""
        await self.start()
        while True:
            node = self._pick()
            if node is None:
                raise SandboxError(f"no live sandbox node left (lost: {', '.join(self.lost)})")
            try:
                session_id = await self._call(node, "open_session", timeout=self.pool_kwargs.get("start_budget_s", 60.0))
                break
            except NodeLost:
                continue
        session = RaySession(self, node, session_id)
        node.sessions += 1
        try:
            yield session
        finally:
            node.sessions -= 1
            if node.alive:
                try:
                    await self._call(node, "close_session", session_id)
                except NodeLost:
                    pass

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Each live node's pool metrics, by node id."""
        live = [node for node in self.nodes if node.alive]
        found = await asyncio.gather(*(self._call(node, "metrics") for node in live), return_exceptions=True)
        return {node.id: m for node, m in zip(live, found) if not isinstance(m, BaseException)}

    async def close(self) -> None:
        import ray

        nodes, self.nodes = self.nodes, []
        for node in nodes:
            if node.alive:
                try:
                    await self._call(node, "close")
                except NodeLost:
                    pass
            ray.kill(node.actor, no_restart=True)

    async def __aenter__(self) -> RaySandboxPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------------
    def _pick(self) -> _Node | None:
        """The live node with the least calls in flight plus sessions open; ties rotate."""
        live = [node for node in self.nodes if node.alive]
        if not live:
            return None
        turn = next(self._turns) % len(live)
        rotated = live[turn:] + live[:turn]
        return min(rotated, key=lambda node: node.load)

    async def _call(self, node: _Node, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One actor call; NodeLost (and the node dropped) when the node is gone.

        A call may wait long in a busy node's queue, so running past its timeout plus the grace
        is not proof of death: the node is then pinged, and dropped only if the ping goes
        unanswered for the grace too.
        """
        import ray

        patience = (self.timeout if timeout is None else timeout) + self.call_grace_s
        node.in_flight += 1
        try:
            reply = asyncio.wrap_future(getattr(node.actor, method).remote(*args).future())
            while True:
                done, _ = await asyncio.wait({reply}, timeout=patience)
                if done:
                    result = reply.result()
                    break
                ping = asyncio.wrap_future(node.actor.node_id.remote().future())
                await asyncio.wait_for(ping, self.call_grace_s)
                patience = self.call_grace_s
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as error:
            self._drop(node, error)
            raise NodeLost(node.id) from error
        finally:
            node.in_flight -= 1
        self.stats[node.id] += 1
        return result

    def _drop(self, node: _Node, error: BaseException) -> None:
        if node.alive:
            node.alive = False
            self.lost.append(f"{node.id[:12]} ({type(error).__name__})")


class RaySession:
    """A session on one node of a RaySandboxPool."""

    def __init__(self, pool: RaySandboxPool, node: _Node, session_id: int) -> None:
        self.pool = pool
        self.node = node
        self.session_id = session_id

    @property
    def node_id(self) -> str:
        return self.node.id

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        if not self.node.alive:
            return ExecResult.failure(f"the node of this session ({self.node.id[:12]}) was lost; its files and state are gone")
        try:
            return await self.pool._call(self.node, "session_run", self.session_id, code, kwargs,
                                         timeout=kwargs.get("timeout"))
        except NodeLost:
            return ExecResult.failure(f"the node of this session ({self.node.id[:12]}) was lost; its files and state are gone")
