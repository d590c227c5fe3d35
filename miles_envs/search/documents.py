"""Documents and corpora: JSONL in, passages formatted the way Search-R1 shows them to the model."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    score: float | None = None

    @property
    def contents(self) -> str:
        """Search-R1's single-field form: the title on the first line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def document_from_record(record: dict[str, Any], line: int | None = None) -> Document:
    """Accept ``{"id", "title", "text"}`` or Search-R1's ``{"id", "contents": "title\\ntext"}``."""
    if "text" in record:
        title, text = record.get("title") or "", record["text"]
    elif "contents" in record:
        title, _, text = record["contents"].partition("\n")
        title = title.strip('"')
    else:
        where = f"line {line}: " if line is not None else ""
        raise ValueError(f"{where}a corpus record needs 'text' (with optional 'title') or 'contents'; got {sorted(record)}")
    doc_id = record.get("id", record.get("_id", line))
    return Document(str(doc_id), title, text, record.get("score"))


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Stream documents from a JSONL file; a record without an id gets its line number."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield document_from_record(json.loads(line), number)


def format_passages(documents: Sequence[Document]) -> str:
    """``Doc 1(Title: ...) text`` lines, as Search-R1 renders retrieval results."""
    if not documents:
        return "No results found."
    return "\n".join(f"Doc {rank}(Title: {doc.title}) {doc.text}" for rank, doc in enumerate(documents, start=1))
