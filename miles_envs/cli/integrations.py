"""``miles-envs serve-session`` and ``miles-envs foreign``: the OpenAI-compatible endpoint and foreign env libraries."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from miles_envs.cli.common import fail, needs_extras

console = Console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("serve-session")
    def serve_session_cmd(
        engine: str = typer.Option(..., "--engine", help="sglang://HOST:PORT | embedded:PATH | scripted[:REPLY]"),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="qwen3|qwen2_5|llama3|deepseek_v3 or a folder"),
        script: Optional[Path] = typer.Option(None, "--script", help="scripted engine: JSON list of replies"),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 picks a free port"),
        model: str = typer.Option("miles-envs", "--model", help="the model name reported to clients"),
    ) -> None:
        """Serve /v1/chat/completions in front of an engine, recording each session's exact token ids."""
        with needs_extras("serve-session"):
            from miles_envs.integrations.session_server import create_app
            from miles_envs.serving import HTTPServer, run_forever
        from miles_envs.cli.wiring import build_engine, build_renderer
        from miles_envs.parsers import parser_for

        try:
            renderer = build_renderer(engine, tokenizer)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
        app_ = create_app(lambda: build_engine(engine, renderer.tokenizer, script), renderer, parser_for(renderer.tokenizer), model=model)
        try:
            run_forever(HTTPServer(app_, host=host, port=port, lifespan=True), lambda server: console.print(
                f"OpenAI base_url: {server.url}/sessions/<session-id>/v1 (or /v1 with an X-Session-Id header); "
                f"records at GET /sessions/<session-id>"
            ))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port (0 picks a free one)")

    @app.command("foreign")
    def foreign_cmd() -> None:
        """Show the foreign env libraries, whether each is installed, and how to install it."""
        from rich.markup import escape

        from miles_envs.integrations.foreign import LIBRARIES

        table = Table(title="foreign env libraries")
        for column in ("prefix", "library", "installed", "install with"):
            table.add_column(column)
        for lib in LIBRARIES.values():
            table.add_row(f"{lib.namespace}:", lib.distribution, "yes" if lib.installed else "no", escape(f"pip install 'miles-envs[{lib.extra}]'"))
        Console().print(table)
