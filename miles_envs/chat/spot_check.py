"""A fast path kept honest: compared with the exact path on its first use and every ``verify_every``-th
after, and turned off for good by one mismatch (results stay exact, only slower)."""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

T = TypeVar("T")


class SpotChecked:
    """Base of the renderer's shortcuts; a subclass sets ``verify_every`` and drops its caches in ``forget``."""

    verify_every: int
    enabled: bool = True
    calls: int = 0

    def spot_checked(self, fast: T, exact: Callable[[], T], what: str) -> T:
        """``fast``, or on a checked use the exact result (turning the shortcut off when they differ)."""
        self.calls += 1
        if (self.calls - 1) % self.verify_every:
            return fast
        real = exact()
        if real != fast:
            self.enabled = False
            self.forget()
            warnings.warn(f"{what} turned off (results stay exact, only slower)", RuntimeWarning, stacklevel=3)
        return real

    def forget(self) -> None:
        """Drop what the shortcut cached."""
