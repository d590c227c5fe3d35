"""Code sandboxes: run untrusted code with no network, bounded resources and nothing left behind.

    from miles_envs.sandbox import make_sandbox, Limits, SandboxPool

    sandbox = make_sandbox("local")            # or "docker", "e2b"
    result = await sandbox.run("print(1)")      # ExecResult(stdout="1\\n", exit_code=0, ...)
    async with sandbox.session() as s:          # files and interpreter globals persist
        await s.run("x = 41")
        await s.run("print(x + 1)")
    await sandbox.close()

    pool = SandboxPool("local", size=8, max_starting=4)   # warm sandboxes shared by many episodes
    result = await pool.run("print(1)")
    pool.metrics()                              # queue depth, waits, starts, failures

    pool = RaySandboxPool("local", size_per_node=8)       # the same API over a Ray cluster's nodes
"""

from miles_envs.sandbox.base import ExecResult, Limits, Sandbox, SandboxError, SandboxSession
from miles_envs.sandbox.budget import SandboxBudget
from miles_envs.sandbox.factory import BACKENDS, make_sandbox
from miles_envs.sandbox.pool import SandboxPool
from miles_envs.sandbox.ray_pool import RaySandboxPool

__all__ = [
    "BACKENDS",
    "ExecResult",
    "Limits",
    "RaySandboxPool",
    "Sandbox",
    "SandboxBudget",
    "SandboxError",
    "SandboxPool",
    "SandboxSession",
    "make_sandbox",
]
