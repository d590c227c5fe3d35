"""``miles/Search-v0``: Search-R1-style question answering with a ``search(query)`` tool.

The model searches, reads the passages (formatted as Search-R1 does) and answers inside
``<answer></answer>``. Reward components: ``exact_match`` (weight 1), ``f1`` and ``format``
(weight 0, reported for metrics). Out of the box it searches a built-in fictional encyclopedia
with BM25; point it at a prebuilt index, a Search-R1 ``/retrieve`` server, or Tavily instead.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Literal

from miles_envs.env import Message
from miles_envs.envs.tool_env import Reward, Task, ToolEnv, extract_tagged
from miles_envs.search.cassette import CassetteMode
from miles_envs.search.documents import format_passages, read_corpus
from miles_envs.search.metrics import exact_match, f1_score
from miles_envs.search.retriever import Retriever
from miles_envs.tools import tool

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_CORPUS = DATA_DIR / "search_corpus.jsonl"
BUILTIN_QUESTIONS = DATA_DIR / "search_questions.jsonl"


@functools.lru_cache(maxsize=4)
def _corpus_index(path: str) -> Any:
    from miles_envs.search.bm25 import BM25Index

    return BM25Index.build(read_corpus(path))


def load_questions(path: str | Path) -> list[Task]:
    """JSONL rows ``{"id", "question", "answers": [...]}`` (extra fields land in ``Task.metadata``)."""
    tasks = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            answers = row.get("answers", row.get("golden_answers"))
            if "question" not in row or not answers:
                raise ValueError(f"{path}:{number}: a question row needs 'question' and a non-empty 'answers' list")
            extra = {key: value for key, value in row.items() if key not in ("id", "question", "answers")}
            tasks.append(Task(str(row.get("id", number)), row["question"], list(answers), extra))
    return tasks


@functools.lru_cache(maxsize=4)
def _questions(path: str, mtime_ns: int, size: int) -> tuple[Task, ...]:
    """The questions file parsed once per version of it (an env is built per episode); each env gets copies."""
    return tuple(load_questions(path))


def _copy(task: Task) -> Task:
    return Task(task.id, task.prompt, list(task.answer), dict(task.metadata))


def make_retriever(
    *,
    corpus: str | Path | None = None,
    index_dir: str | Path | None = None,
    retriever_url: str | None = None,
    web: Literal["tavily"] | None = None,
    cassette: str | Path | None = None,
    cassette_mode: CassetteMode = "replay",
) -> Retriever:
    """The backend named by exactly one option; none means BM25 over the built-in corpus."""
    chosen = [name for name, value in (("corpus", corpus), ("index_dir", index_dir),
                                        ("retriever_url", retriever_url), ("web", web)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one search backend, got {', '.join(chosen)}")
    if index_dir is not None:
        from miles_envs.search.bm25 import BM25Index

        return BM25Index.load(index_dir)
    if retriever_url is not None:
        from miles_envs.search.http_retriever import HTTPRetriever

        return HTTPRetriever(retriever_url)
    if web is not None:
        if web != "tavily":
            raise ValueError(f"unknown web search backend {web!r}; supported: 'tavily'")
        from miles_envs.search.web import TavilySearch

        return TavilySearch(cassette=cassette, mode=cassette_mode)
    return _corpus_index(str(Path(corpus or BUILTIN_CORPUS).resolve()))


class SearchEnv(ToolEnv):
    max_turns = 6
    system_prompt = (
        "Answer the question. You have a search tool over a knowledge base; search as often as you need, "
        "one fact at a time. When you know the answer, reply without a tool call and give only the short "
        "answer inside <answer></answer>."
    )
    default_reward_weights = {"exact_match": 1.0}

    def __init__(
        self,
        *,
        questions: str | Path | None = None,
        corpus: str | Path | None = None,
        index_dir: str | Path | None = None,
        retriever_url: str | None = None,
        web: Literal["tavily"] | None = None,
        cassette: str | Path | None = None,
        cassette_mode: CassetteMode = "replay",
        retriever: Retriever | None = None,
        top_k: int = 3,
        **kwargs: Any,
    ) -> None:
        """``retriever`` (an object) or one of ``corpus`` / ``index_dir`` / ``retriever_url`` / ``web``."""
        path = str(questions or BUILTIN_QUESTIONS)
        stat = os.stat(path)
        super().__init__(tasks=[_copy(task) for task in _questions(path, stat.st_mtime_ns, stat.st_size)], **kwargs)
        backend = dict(corpus=corpus, index_dir=index_dir, retriever_url=retriever_url, web=web)
        if retriever is not None and any(value is not None for value in backend.values()):
            raise ValueError("pass either retriever= or a backend option, not both")
        self.retriever = retriever or make_retriever(**backend, cassette=cassette, cassette_mode=cassette_mode)
        self.top_k = top_k

    @tool
    async def search(self, query: str) -> str:
        """Search the knowledge base; returns the best-matching passages.

        Args:
            query: What to look for, e.g. a name and the fact you need.
        """
        [documents] = await self.retriever.search([query], self.top_k)
        return format_passages(documents)

    def score(self, task: Task, answer: Message) -> Reward:
        prediction = extract_tagged(answer.get("content"))
        if prediction is None:
            return {"exact_match": 0.0, "f1": 0.0, "format": 0.0}
        return {"exact_match": exact_match(prediction, task.answer), "f1": f1_score(prediction, task.answer), "format": 1.0}

    def close(self) -> None:
        if self._loop_thread is not None:  # connections opened through the sync API live on that loop
            self._run_sync(self.retriever.aclose())
        super().close()

    async def aclose(self) -> None:
        await self.retriever.aclose()
        super().close()
