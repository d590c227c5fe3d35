"""Local BM25 retrieval with ``bm25s``, saved as a versioned on-disk index.

Layout of an index directory::

    manifest.json   format name and version, tokenizer settings, document count, corpus digest
    bm25/           bm25s's sparse score matrix, vocabulary and the documents (read lazily)

``manifest.json`` is read first, so an index written by an incompatible version fails with a
message that says to rebuild it, instead of returning wrong results.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from miles_envs.search.documents import Document, document_from_record

FORMAT = "miles-envs/bm25"
FORMAT_VERSION = 1
STEMMER_LANGUAGE = "english"
STOPWORDS = "en"
TOKEN_PATTERN = r"(?u)\b\w+\b"  # single characters count: "Route 9", "Vitamin C"


class IndexFormatError(ValueError):
    """The directory is not an index this version can read."""


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(STEMMER_LANGUAGE)


def _tokenize(texts: list[str], stemmer: Any, *, return_ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(
        texts,
        token_pattern=TOKEN_PATTERN,
        stopwords=STOPWORDS,
        stemmer=stemmer,
        return_ids=return_ids,
        show_progress=False,
    )


class BM25Index:
    """A BM25 index over documents; :meth:`query` answers a batch of queries at once."""

    def __init__(self, retriever: Any, documents: Sequence[Any], manifest: dict[str, Any]) -> None:
        self._retriever = retriever
        self._documents = documents
        self.manifest = manifest
        self._stemmer = _stemmer()

    @classmethod
    def build(cls, documents: Iterable[Document]) -> BM25Index:
        import bm25s

        docs = list(documents)
        if not docs:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        digest = hashlib.sha256()
        for doc in docs:
            digest.update(json.dumps([doc.id, doc.title, doc.text]).encode())
        retriever = bm25s.BM25()
        retriever.index(_tokenize([f"{d.title}\n{d.text}" for d in docs], _stemmer(), return_ids=True), show_progress=False)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bm25s_version": bm25s.__version__,
            "num_documents": len(docs),
            "corpus_sha256": digest.hexdigest(),
            "tokenizer": {"pattern": TOKEN_PATTERN, "stemmer": STEMMER_LANGUAGE, "stopwords": STOPWORDS},
            "bm25": {"method": retriever.method, "k1": retriever.k1, "b": retriever.b},
        }
        return cls(retriever, [doc.to_json() for doc in docs], manifest)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(directory / "bm25"), corpus=list(self._documents), show_progress=False)
        (directory / "manifest.json").write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> BM25Index:
        import bm25s

        directory = Path(directory)
        manifest = read_manifest(directory)
        retriever = bm25s.BM25.load(str(directory / "bm25"), load_corpus=True, mmap=mmap, show_progress=False)
        documents, retriever.corpus = retriever.corpus, None  # retrieve() returns ids; documents are looked up here
        return cls(retriever, documents, manifest)

    def __len__(self) -> int:
        return self.manifest["num_documents"]

    def query(self, queries: Sequence[str], k: int) -> list[list[Document]]:
        """Top-``k`` documents per query, best first; documents sharing no term with the query are left out."""
        if not queries:
            return []
        tokens = _tokenize(list(queries), self._stemmer, return_ids=False)
        ids, scores = self._retriever.retrieve(tokens, k=min(k, len(self)), show_progress=False)
        return [
            [
                document_from_record({**self._documents[int(doc)], "score": float(score)})
                for doc, score in zip(row_ids, row_scores)
                if score > 0
            ]
            for row_ids, row_scores in zip(ids, scores)
        ]

    async def search(self, queries: Sequence[str], k: int) -> list[list[Document]]:
        return await asyncio.to_thread(self.query, queries, k)

    async def aclose(self) -> None:
        return None


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        raise IndexFormatError(f"{directory} is not a BM25 index (no manifest.json); build one with `miles-envs index build`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this miles-envs reads {FORMAT!r} version {FORMAT_VERSION}: rebuild it with `miles-envs index build`"
        )
    return manifest
