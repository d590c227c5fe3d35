"""Retrieval for search environments: local BM25, Search-R1's HTTP ``/retrieve`` API, and web search.

Every backend implements :class:`~miles_envs.search.retriever.Retriever` (batched, async). Import
the backend modules directly; this package stays light (bm25s loads only when an index is used).
"""
