"""Code sandboxes: run untrusted code with no network, bounded resources and nothing left behind.

    from miles_envs.sandbox import make_sandbox, Limits, SandboxPool

    sandbox = make_sandbox("local")            # or "docker", "e2b"
    result = await sandbox.run("print(1)")      # ExecResult(stdout="1\\n", exit_code=0, ...)
    async with sandbox.session() as s:          # files and interpreter globals persist
        await s.run("x = 41")
        await s.run("print(x + 1)")
    await sandbox.close()

    pool = SandboxPool("local", size=8)         # warm sandboxes shared by many episodes
    result = await pool.run("print(1)")
"""

from miles_envs.sandbox.base import ExecResult, Limits, Sandbox, SandboxError, SandboxSession
from miles_envs.sandbox.factory import BACKENDS, make_sandbox
from miles_envs.sandbox.pool import SandboxPool

__all__ = [
    "BACKENDS",
    "ExecResult",
    "Limits",
    "Sandbox",
    "SandboxError",
    "SandboxPool",
    "SandboxSession",
    "make_sandbox",
]
