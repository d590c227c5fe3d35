"""Wires every command group into one typer app; the only module that sees all subpackages."""

import typer

from miles_envs.cli import bench, envs, integrations, models, rollout, search, train, view
from miles_envs.cli.common import show_flags_bare

show_flags_bare()
app = typer.Typer(name="miles-envs", help="Multi-turn RL environments for LLM agents.", no_args_is_help=True)

for module in (envs, integrations, models, rollout, train, search, view, bench):
    module.register(app)
