"""The integrations CLI module on its own typer app (the lead wires it into ``miles-envs``)."""

import typer
from typer.testing import CliRunner

from miles_envs.cli import integrations
from miles_envs.integrations.foreign import LIBRARIES


def app() -> typer.Typer:
    root = typer.Typer()
    integrations.register(root)
    return root


def test_foreign_lists_every_library_with_its_extra():
    result = CliRunner().invoke(app(), ["foreign"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for lib in LIBRARIES.values():
        assert f"{lib.namespace}:" in result.output and f"miles-envs[{lib.extra}]" in result.output


def test_serve_session_requires_an_engine():
    result = CliRunner().invoke(app(), ["serve-session"])
    assert result.exit_code != 0 and "--engine" in result.output
