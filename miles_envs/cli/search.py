"""Search index commands: ``index build``, ``index query``, ``index serve``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from miles_envs.cli.common import console, fail


def register(app: typer.Typer) -> None:
    index = typer.Typer(help="Build, query and serve local BM25 search indexes.", no_args_is_help=True)
    app.add_typer(index, name="index")

    @index.command("build")
    def build_cmd(
        corpus: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL: {id, title, text} or {id, contents}"),
        out: Path = typer.Option(..., "-o", "--out", help="index directory to write"),
    ) -> None:
        """Build a BM25 index over a JSONL corpus and save it (versioned) to DIR."""
        from miles_envs.search.bm25 import BM25Index
        from miles_envs.search.documents import read_corpus

        start = time.perf_counter()
        with console.status(f"indexing {corpus}"):
            try:
                built = BM25Index.build(read_corpus(corpus))
            except (ValueError, json.JSONDecodeError) as error:
                fail(f"{corpus}: {error}")
            built.save(out)
        seconds = time.perf_counter() - start
        metrics = {"corpus": str(corpus), "index": str(out), "documents": len(built), "seconds": round(seconds, 3)}
        (out / "build_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        console.print(f"indexed [bold]{len(built)}[/] documents in {seconds:.1f} s → {out}")

    @index.command("query")
    def query_cmd(
        directory: Path = typer.Argument(..., help="index directory"),
        queries: list[str] = typer.Argument(..., help="one or more queries"),
        k: int = typer.Option(3, "-k", help="documents per query"),
    ) -> None:
        """Print the top documents for each query."""
        from miles_envs.search.bm25 import BM25Index, IndexFormatError

        try:
            loaded = BM25Index.load(directory)
        except IndexFormatError as error:
            fail(str(error))
        for query, documents in zip(queries, loaded.query(queries, k)):
            table = Table(title=query)
            for column in ("score", "id", "title", "text"):
                table.add_column(column)
            for doc in documents:
                table.add_row(f"{doc.score:.3f}", doc.id, doc.title, doc.text[:120])
            console.print(table)

    @index.command("serve")
    def serve_cmd(
        directory: Path = typer.Argument(..., help="index directory"),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
    ) -> None:
        """Serve the index over Search-R1's ``POST /retrieve`` API until interrupted."""
        from miles_envs.search.bm25 import BM25Index, IndexFormatError
        from miles_envs.search.http_retriever import serve

        try:
            loaded = BM25Index.load(directory)
        except IndexFormatError as error:
            fail(str(error))
        server = serve(loaded.query, host, port)
        bound_host, bound_port = server.server_address[:2]
        console.print(f"serving {len(loaded)} documents at http://{bound_host}:{bound_port}/retrieve (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
