"""Registry commands: register, unregister, list, info, check."""

from __future__ import annotations

import inspect
import json
from typing import Optional

import typer
from rich.table import Table

from miles_envs.cli.common import console, err, fail


def parse_kwargs(text: str) -> dict:
    """``--kwargs`` as a JSON object, or a one-line error with an example."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--kwargs is not valid JSON ({exc}); e.g. --kwargs '{{\"high\": 50}}'")
    if not isinstance(parsed, dict):
        fail(f"--kwargs must be a JSON object, not a {type(parsed).__name__}; e.g. --kwargs '{{\"high\": 50}}'")
    return parsed


def stale_hint(env_spec) -> str:
    """How to repair a registration kept in a store when its class changed or moved."""
    if env_spec.source not in ("user", "project"):
        return ""
    return (f"; the {env_spec.source} registration ({env_spec.origin}) may be stale: re-register it with "
            f"`miles-envs register ... --id {env_spec.id} --override`, or `miles-envs unregister {env_spec.id}`")


def register(app: typer.Typer) -> None:
    @app.command("register")
    def register_cmd(
        entry: str = typer.Argument(..., help="module:Class or path/to/file.py:Class"),
        id: str = typer.Option(..., "--id", help="env id, e.g. demo/My-v0"),
        kwargs: str = typer.Option("{}", "--kwargs", help="default constructor kwargs as JSON"),
        max_turns: Optional[int] = typer.Option(None, "--max-turns", min=1),
        description: str = typer.Option("", "--description"),
        tag: list[str] = typer.Option([], "--tag", help="repeatable"),
        scope: str = typer.Option("user", "--scope", help="user (~/.config) or project (./miles-envs.toml)"),
        override: bool = typer.Option(False, "--override", help="replace an existing registration"),
    ) -> None:
        """Register an env class persistently so `make(ID)` finds it in any process."""
        from miles_envs.registry import EnvSpec, RegistryError, default_registry

        parsed = parse_kwargs(kwargs)
        try:
            spec = EnvSpec(id=id, entry_point=entry, kwargs=parsed, max_turns=max_turns, description=description, tags=tag)
            spec.check()  # fail now, not at first make()
            path = default_registry.persist(spec, scope, override=override)
        except (RegistryError, ValueError) as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot write the {scope} registry ({exc}); check the folder's permissions")
        console.print(f"registered [bold]{id}[/] → {entry} ({scope}: {path})")

    @app.command("unregister")
    def unregister_cmd(
        id: str,
        scope: str = typer.Option("user", "--scope", help="user or project"),
    ) -> None:
        """Remove a persistent registration."""
        from miles_envs.registry import RegistryError, store_for

        try:
            store_for(scope).remove(id)
        except (RegistryError, ValueError) as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot write the {scope} registry ({exc}); check the folder's permissions")
        console.print(f"unregistered [bold]{id}[/] ({scope})")

    @app.command("list")
    def list_cmd(
        tag: Optional[str] = typer.Option(None, "--tag", help="only envs with this tag"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
        all_libraries: bool = typer.Option(False, "--all", help="also envs of installed foreign libraries"),
    ) -> None:
        """List registered envs with where each comes from."""
        from miles_envs.registry import RegistryError, list_specs

        try:
            specs = list_specs(tag=tag)
        except RegistryError as exc:
            fail(str(exc))
        max_turns = {s.id: s.class_max_turns() for s in specs}  # before foreign envs: loading those imports their library
        if all_libraries:
            from miles_envs.integrations.foreign import foreign_specs

            specs += [s for s in foreign_specs() if tag is None or tag in s.tags]
        if as_json:
            rows = [
                {"id": s.id, "entry_point": str(s.entry_point), "source": s.source, "max_turns": max_turns.get(s.id, s.max_turns),
                 "tags": s.tags, "description": s.description, "kwargs": s.kwargs}
                for s in specs
            ]
            print(json.dumps(rows, indent=2))
            return
        table = Table(title=f"{len(specs)} environments")
        table.add_column("id", no_wrap=True)
        for column in ("source", "max turns", "tags", "description"):
            table.add_column(column)
        for s in specs:
            table.add_row(s.id, s.source, str(max_turns.get(s.id, s.max_turns) or "-"), ", ".join(s.tags), s.description)
        console.print(table)
        if not specs and tag is not None:
            err.print(f"no registered env has the tag {tag!r}")

    @app.command("info")
    def info_cmd(id: str) -> None:
        """Show an env's spec, docstring and tool schemas."""
        from miles_envs.registry import RegistryError, spec

        try:
            env_spec = spec(id)
        except RegistryError as exc:
            fail(str(exc))
        try:
            factory = env_spec.check()
            env = env_spec.make()
            _, reset_info = env.reset(seed=0)
            env.close()
        except RegistryError as exc:
            fail(f"{exc}{stale_hint(env_spec)}")
        except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one line
            fail(f"{id}: building and resetting it raised {type(exc).__name__}: {exc}{stale_hint(env_spec)}")
        console.print(f"[bold]{env_spec.id}[/] ({env_spec.source})")
        console.print(f"entry point: {env_spec.entry_point}\nkwargs: {env_spec.kwargs}\nmax turns: {env_spec.class_max_turns() or '-'}")
        console.print(f"tags: {', '.join(env_spec.tags) or '-'}\ndescription: {env_spec.description or '-'}")
        own_doc = vars(factory).get("__doc__") if inspect.isclass(factory) else factory.__doc__  # not a base class's
        console.print(f"\n{inspect.cleandoc(own_doc) if own_doc else '(no docstring)'}")
        tools = reset_info.get("tools")
        if tools:
            console.print("\n[bold]tools[/]")
            console.print_json(json.dumps(tools))

    @app.command("check")
    def check_cmd(
        id: str,
        seed: int = typer.Option(0, "--seed"),
        kwargs: str = typer.Option("{}", "--kwargs", help="constructor overrides as JSON"),
    ) -> None:
        """Run the conformance checker on an env; non-zero exit on any failure."""
        from miles_envs.checker import check_env
        from miles_envs.registry import RegistryError, spec

        overrides = parse_kwargs(kwargs)
        try:
            env_spec = spec(id)
            env_spec.check(**overrides)
            env = env_spec.make(**overrides)
        except RegistryError as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one line
            fail(f"constructing {id} raised {type(exc).__name__}: {exc}")
        report = check_env(env, seed=seed, raise_on_failure=False, name=id)
        table = Table(title=f"check {id}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for r in report.results:
            table.add_row(r.name, "[green]ok[/]" if r.passed else "[red]FAIL[/]", r.detail)
        console.print(table)
        if not report.ok:
            raise typer.Exit(1)
