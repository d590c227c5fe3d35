"""``miles-envs bench``: run the ``bench/`` scripts and print one table of measures against targets."""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from miles_envs import benchrun
from miles_envs.benchrun import Measure, NotACheckout, Outcome
from miles_envs.cli.common import check_output_file, check_output_folder, console, fail, status

MET = {True: "met", False: "missed", None: ""}
STYLE = {True: "green", False: "red", None: ""}


def format_value(measure: Measure) -> str:
    value = measure.value
    if value is None:
        return "—"
    # three significant digits below 100 (a 1.04× ratio must not read as 1.0×)
    digits = ",.0f" if abs(value) >= 100 else ".1f" if abs(value) >= 10 else ".2f" if abs(value) >= 1 else ".3g"
    text = format(value, digits)
    return f"{text}×" if measure.unit == "×" else f"{text} {measure.unit}".rstrip()


def rows(outcomes: list[Outcome]) -> list[tuple[str, str, str, str, bool | None, str]]:
    """(bench, measure, value, target, met, note); a bench without measures gets one row saying why."""
    out = []
    for outcome in outcomes:
        name = outcome.bench.name
        if not outcome.measures:
            out.append((name, f"bench/{outcome.bench.script}: {outcome.status}", "—", "", None, outcome.detail))
        for m in outcome.measures:
            out.append((name, m.name, format_value(m), m.target.text if m.target else "", m.met, m.note))
    return out


def rich_table(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("bench", "measure", "value", "target", "", "note"):
        table.add_column(column, justify="right" if column == "value" else "left", overflow="fold")
    for bench, measure, value, target, met, note in rows(outcomes):
        table.add_row(bench, measure, value, target, f"[{STYLE[met]}]{MET[met]}[/]" if met is not None else "", note)
    return table


def markdown(outcomes: list[Outcome], machine: str, command: str) -> str:
    """The README "Performance" section: machine, table, how each bench ran, how to reproduce."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "## Performance",
        "",
        f"Measured on {machine}, {date.today().isoformat()}. Regenerate with `{command}` "
        "(each script prints its own table and writes `bench/results/NAME.json`; "
        "`miles-envs bench --stored --markdown README.md` rebuilds this section from those files).",
        "",
        "| measure | value | target | status | note |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for _, measure, value, target, met, note in rows(outcomes):
        lines.append(f"| {cell(measure)} | {value} | {cell(target)} | {MET[met]} | {cell(note)} |")
    lines += ["", "What each bench measures, and how it ran:", ""]
    for outcome in outcomes:
        seconds = f", {outcome.seconds:.0f} s" if outcome.seconds else ""
        detail = f": {outcome.detail}" if outcome.detail else ""
        about = f" ({outcome.bench.about})" if outcome.bench.about else ""
        lines.append(f"- `bench/{outcome.bench.script}`{about} — {outcome.status}{seconds}{detail}")
    return "\n".join(lines) + "\n"


SECTION_START, SECTION_END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_markdown(path: Path, section: str) -> None:
    """Write the section; in a file that marks a bench section (the README), replace just that part."""
    text = path.read_text() if path.is_file() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1]
        path.write_text(f"{head}{SECTION_START}\n{section}{SECTION_END}{tail}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(section)


def bench(
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only this bench (repeatable).")] = None,
    quick: Annotated[bool, typer.Option(help="Small sizes, for a smoke run; results go to a temporary folder.")] = False,
    results: Annotated[Optional[Path], typer.Option(help="Folder for result JSON and logs (default bench/results).")] = None,
    stored: Annotated[bool, typer.Option(help="Run nothing: build the table from the result files present.")] = False,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as markdown here.")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds one script may run.")] = 3600,
) -> None:
    """Run the benchmark scripts one after another and print one table: each measure, its target
    from the issues, and whether it is met (a source-checkout tool: the scripts live in its bench/)."""
    from miles_envs.benchrun import machine_summary, run_benches, select, stored_outcomes

    try:
        bench_dir = benchrun.checkout_bench_dir()
        chosen = select(only or [])
    except (NotACheckout, ValueError) as error:
        fail(str(error))
    default_results = Path(tempfile.gettempdir()) / "miles-envs-bench-quick" if quick else bench_dir / "results"
    results_dir = (results or default_results).resolve()
    if markdown_out is not None:
        check_output_file(markdown_out, "--markdown")
    if stored:
        if not results_dir.is_dir():
            fail(f"--stored: no results folder at {results_dir}; run the benches first, or give --results")
        outcomes = stored_outcomes(chosen, results_dir)
    else:
        if not results_dir.is_dir():
            check_output_folder(results_dir, "--results")
        with status("starting benches") as running:
            outcomes = run_benches(chosen, results_dir, quick=quick, timeout=timeout,
                                   on_start=lambda b: running.update(f"running bench/{b.script}"))
    machine = machine_summary()
    console.print(rich_table(outcomes, title=f"miles-envs benchmarks{' (quick)' if quick else ''}"))
    console.print(f"[dim]{machine}; results in {results_dir}[/dim]")
    if markdown_out is not None:
        command = "miles-envs bench" + "".join(f" --only {b.name}" for b in chosen if only) + (" --quick" if quick else "")
        write_markdown(markdown_out, markdown(outcomes, machine, command))
        console.print(f"wrote {markdown_out}")
    if any(outcome.status == "failed" for outcome in outcomes):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
