"""Wires every command group into one typer app; the only module that sees all subpackages."""

import typer

from miles_envs.cli import bench, envs, integrations, models, plot, rollout, search, train, view

app = typer.Typer(name="miles-envs", help="Multi-turn RL environments for LLM agents.", no_args_is_help=True)

for module in (envs, integrations, models, rollout, train, plot, search, view, bench):
    module.register(app)
