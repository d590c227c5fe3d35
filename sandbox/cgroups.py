"""cgroup v2 memory and pids limits for a local sandbox, used only where the tree is writable.

rlimits bound each process; a cgroup bounds the sandbox as a whole (a fork bomb of small processes,
the tmpfs pages it writes). Machines with cgroup v1 or a read-only cgroupfs get rlimits only.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from miles_envs.sandbox.base import Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_NAME = "miles-envs-sandbox"


def _parent() -> Path | None:
    """A writable cgroup directory whose children get the memory and pids controllers, or None."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    try:
        if not {"memory", "pids"} <= set(controllers.read_text().split()):
            return None
        parent = CGROUP_ROOT / PARENT_NAME
        parent.mkdir(exist_ok=True)
        (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory +pids")
        (parent / "cgroup.subtree_control").write_text("+memory +pids")
        return parent
    except OSError:
        return None


class SandboxCgroup:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, limits: Limits, prefix: str = "") -> SandboxCgroup | None:
        """A new cgroup named ``prefix`` + a random part, or None where cgroups are not writable."""
        parent = _parent()
        if parent is None:
            return None
        path = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(limits.memory_mb * 1024 * 1024))
            (path / "memory.swap.max").write_text("0")
            (path / "pids.max").write_text(str(limits.pids + 4))  # + bwrap, its init and the runner
        except OSError:
            cls(path).remove()
            return None
        return cls(path)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError:
            pass
        try:
            os.rmdir(self.path)
        except OSError:
            pass
