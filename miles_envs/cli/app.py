"""Wires every command group into one typer app; the only module that sees all subpackages."""

import typer

app = typer.Typer(name="miles-envs", help="Multi-turn RL environments for LLM agents.", no_args_is_help=True)
