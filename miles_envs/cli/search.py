"""Search index commands: ``index build``, ``index query``, ``index serve``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from miles_envs.cli.common import (
    check_output_folder, clear_output_folder, console, fail, needs_extras, removed_on_failure, status,
)

CORPUS_FORMAT = 'each line must be a JSON object: {"id", "title", "text"} or {"id", "contents"}'


def load_index(directory: Path, command: str):
    """The saved index, or a one-line error (not an index, another format version, bm25s missing)."""
    from miles_envs.search.bm25 import BM25Index

    if not directory.is_dir():
        fail(f"{directory} is not a folder; give an index built with `miles-envs index build`")
    with needs_extras(command):
        try:
            return BM25Index.load(directory)
        except (ValueError, OSError) as error:  # IndexFormatError is a ValueError
            fail(f"{directory}: {error}")


def register(app: typer.Typer) -> None:
    index = typer.Typer(help="Build, query and serve local BM25 search indexes.", no_args_is_help=True)
    app.add_typer(index, name="index")

    @index.command("build")
    def build_cmd(
        corpus: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL: {id, title, text} or {id, contents}"),
        out: Path = typer.Option(..., "-o", "--out", help="new (or empty) index directory to write"),
        force: bool = typer.Option(False, "--force", help="replace what --out holds"),
    ) -> None:
        """Build a BM25 index over a JSONL corpus and save it (versioned) to DIR."""
        if out.resolve() in corpus.resolve().parents:
            fail(f"--out {out} holds the corpus {corpus}; write the index to a folder of its own")
        check_output_folder(out, "--out", force=force)
        from miles_envs.search.bm25 import BM25Index
        from miles_envs.search.documents import read_corpus

        start = time.perf_counter()
        with status(f"indexing {corpus}"), needs_extras("index build"):
            try:
                built = BM25Index.build(read_corpus(corpus))
            except (ValueError, TypeError, AttributeError) as error:
                fail(f"{corpus}: {error}; {CORPUS_FORMAT}")
            if force:
                clear_output_folder(out)
            with removed_on_failure(out):
                built.save(out)
                seconds = time.perf_counter() - start
                metrics = {"corpus": str(corpus), "index": str(out), "documents": len(built), "seconds": round(seconds, 3)}
                (out / "build_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        console.print(f"indexed [bold]{len(built)}[/] documents in {seconds:.1f} s → {out}")

    @index.command("query")
    def query_cmd(
        directory: Path = typer.Argument(..., help="index directory"),
        queries: list[str] = typer.Argument(..., help="one or more queries"),
        k: int = typer.Option(3, "-k", min=1, help="documents per query"),
    ) -> None:
        """Print the top documents for each query."""
        loaded = load_index(directory, "index query")
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
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 picks a free port"),
    ) -> None:
        """Serve the index over Search-R1's ``POST /retrieve`` API until interrupted."""
        from miles_envs.search.http_retriever import serve

        loaded = load_index(directory, "index serve")
        try:
            server = serve(loaded.query, host, port)
        except OSError as error:
            fail(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port (0 picks a free one)")
        bound_host, bound_port = server.server_address[:2]
        console.print(f"serving {len(loaded)} documents at http://{bound_host}:{bound_port}/retrieve (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
