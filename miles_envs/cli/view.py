"""``miles-envs view``: a self-contained HTML page for a trajectory file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from miles_envs.cli.common import check_output_file, console, fail, needs_extras, quiet_loaders, removed_on_failure, track


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
    from miles_envs.cli.wiring import load_checked_tokenizer, resolve_tokenizer
    from miles_envs.trajectory_io import read_trajectories
    from miles_envs.viewer import write_page

    if not file.is_file():
        fail(f"no trajectory file at {file}")
    output = output or file.with_suffix(".html")
    if output.resolve() == file.resolve():
        fail(f"--output {output} is the trajectory file itself; give another path (default: {file.with_suffix('.html')})")
    check_output_file(output, "--output")
    try:
        if tokenizer is not None:
            resolve_tokenizer(tokenizer)
    except ValueError as exc:
        fail(str(exc))
    with needs_extras("view"):
        try:
            trajectories = read_trajectories(file)
        except (ValueError, KeyError, TypeError) as exc:
            fail(f"{file} is not a trajectory file ({type(exc).__name__}: {exc}); give a file written by `miles-envs rollout`")
        quiet_loaders()
        try:
            loaded_tokenizer = None if tokenizer is None else load_checked_tokenizer(tokenizer)
        except ValueError as exc:
            fail(str(exc))
    with removed_on_failure(output, make_parent=True):
        stats = write_page(
            track(trajectories, "encoding episodes"), output, tokenizer=loaded_tokenizer, include_routing=routing, title=file.name,
        )
    console.print(f"wrote [bold]{output}[/bold]: {stats.episodes} episodes, {stats.bytes / 1e6:.2f} MB")


def register(app: typer.Typer) -> None:
    app.command("view")(view)
