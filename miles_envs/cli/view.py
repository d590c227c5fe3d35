"""``miles-envs view``: a self-contained HTML page for a trajectory file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import track

from miles_envs.cli.common import console, fail


def view(
    file: Annotated[Path, typer.Argument(help="Trajectories: JSONL (one Trajectory.to_json() per line) or Parquet.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Page to write (default: FILE with .html).")] = None,
    tokenizer: Annotated[
        Optional[str], typer.Option(help="Show token text: qwen3, qwen2_5, llama3, deepseek_v3 or a tokenizer folder.")
    ] = None,
    routing: Annotated[bool, typer.Option(help="Embed routed experts (off: only which tokens carry routing).")] = True,
) -> None:
    """Write an HTML page (opens from disk, no server) to browse trajectories: conversation, token
    view with loss mask, logprob heat, tool calls and routing, filters by env, status and reward."""
    from miles_envs.tokenizers import KNOWN, load_tokenizer
    from miles_envs.trajectory_io import read_trajectories
    from miles_envs.viewer import write_page

    if not file.is_file():
        fail(f"no trajectory file at {file}")
    if tokenizer is not None and tokenizer not in KNOWN and not Path(tokenizer).is_dir():
        fail(f"--tokenizer {tokenizer!r}: give one of {', '.join(KNOWN)} or a folder with tokenizer files")
    try:
        trajectories = read_trajectories(file)
    except ValueError as exc:
        fail(str(exc))
    loaded_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
    output = output or file.with_suffix(".html")
    stats = write_page(
        track(trajectories, description="encoding episodes", console=console, transient=True),
        output,
        tokenizer=loaded_tokenizer,
        include_routing=routing,
        title=file.name,
    )
    console.print(f"wrote [bold]{output}[/bold]: {stats.episodes} episodes, {stats.bytes / 1e6:.2f} MB")


def register(app: typer.Typer) -> None:
    app.command("view")(view)
