"""Wires every command group into one typer app; the only module that sees all subpackages."""

import typer

from miles_envs.cli import bench, envs, integrations, models, plot, rollout, search, train, view
from miles_envs.cli.common import show_flags_bare

show_flags_bare()
app = typer.Typer(name="miles-envs", help="Multi-turn RL environments for LLM agents.", no_args_is_help=True)


def print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"miles-envs {version('miles-envs')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, help="Print the installed version and exit."),
) -> None:
    """Multi-turn RL environments for LLM agents."""


for module in (envs, integrations, models, rollout, train, plot, search, view, bench):
    module.register(app)
