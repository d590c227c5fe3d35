"""The retriever protocol every search backend implements: batched, async, top-k documents per query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from miles_envs.search.documents import Document


@runtime_checkable
class Retriever(Protocol):
    async def search(self, queries: Sequence[str], k: int) -> list[list[Document]]:
        """For each query, up to ``k`` documents, best first."""
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...
