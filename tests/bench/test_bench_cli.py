"""``miles-envs bench`` end to end on tiny settings (real scripts, real subprocesses; no timing asserted)."""

import json
import subprocess
import sys

import typer
from typer.testing import CliRunner

from miles_envs.benchrun import BENCH_DIR, read_results, script_folder, select
from miles_envs.cli import bench as bench_cli


def bench_app() -> typer.Typer:
    app = typer.Typer()
    bench_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `bench` a named subcommand
    return app


def published_state() -> dict[str, float]:
    return {path.name: path.stat().st_mtime for path in (BENCH_DIR / "results").glob("*.json")}


def test_quick_search_bench_prints_table_and_markdown(tmp_path):
    before = published_state()
    out = tmp_path / "results"
    markdown = tmp_path / "docs" / "performance.md"
    result = CliRunner().invoke(bench_app(), ["bench", "--quick", "--only", "search", "--results", str(out),
                                              "--markdown", str(markdown)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "bm25 (in process): queries/s at batch 256" in result.output
    data = json.loads((out / "search.json").read_text())
    assert data["documents"] < 1000  # quick sizes (--scale 2) reached the script
    assert "queries/s @256" in (out / "logs" / "search.log").read_text()
    text = markdown.read_text()
    assert text.startswith("## Performance\n")
    assert "| bm25 via HTTP /retrieve: queries/s at batch 1 |" in text
    assert "`miles-envs bench --only search --quick`" in text
    assert "- `bench/search.py` (BM25 over the generated encyclopedia" in text
    assert "— ran, " in text and ": --scale 2 --rounds 1" in text
    assert published_state() == before


def test_stored_mode_runs_nothing_and_reports_missing_results(tmp_path):
    result = CliRunner().invoke(bench_app(), ["bench", "--stored", "--only", "search", "--results", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "bench/search.py: no results" in result.output
    assert list(tmp_path.iterdir()) == []


def test_unknown_bench_name_exits_with_suggestion():
    result = CliRunner().invoke(bench_app(), ["bench", "--only", "sandboxx"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "no bench named 'sandboxx' (did you mean sandbox, sandbox_load?)" in result.output


def test_peers_script_measures_both_miles_envs_paths(tmp_path):
    """The peer libraries need their own venvs (pip); this runs the two in-repo rows for real."""
    out = tmp_path / "results"
    with script_folder(out) as folder:
        done = subprocess.run(
            [sys.executable, str(folder / "peers.py"), "--only", "miles-envs rollout loop",
             "--episodes", "3", "--turns", "4", "--repeats", "1"],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "peers.json").read_text())
    ours, loop = data["rows"]
    assert (ours["library"], loop["library"]) == ("miles-envs", "miles-envs rollout loop")
    assert ours["turns"] == loop["turns"] == 12
    assert ours["ratio_vs_ours"] == 1.0 and loop["ratio_vs_ours"] > 0
    outcome = read_results(select(["peers"])[0], out / "peers.json", "stored")
    assert [m.name for m in outcome.measures] == [
        "per-turn overhead, miles-envs env API (base of the ratios)",
        "per-turn overhead, miles-envs rollout loop ÷ miles-envs env API",
    ]


def test_peers_script_reports_a_library_that_cannot_run(tmp_path):
    out = tmp_path / "results"
    venvs = tmp_path / "venvs"
    broken = venvs / "verifiers" / "bin"
    broken.mkdir(parents=True)
    # a stand-in interpreter without the package: the row must carry the reason, not crash the run
    (broken / "python").symlink_to(sys.executable)
    with script_folder(out) as folder:
        done = subprocess.run(
            [sys.executable, str(folder / "peers.py"), "--only", "verifiers", "--episodes", "2", "--turns", "2",
             "--repeats", "1", "--venvs", str(venvs)],
            capture_output=True, text=True, timeout=300,
        )
    assert done.returncode == 0, done.stderr
    rows = {row["library"]: row for row in json.loads((out / "peers.json").read_text())["rows"]}
    assert "us_per_turn" in rows["miles-envs"]
    assert "verifiers" in rows["verifiers"]["error"]


def test_markdown_replaces_only_the_marked_section(tmp_path):
    from miles_envs.cli.bench import SECTION_END, SECTION_START, write_markdown

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{SECTION_START}\nold table\n{SECTION_END}\n\n## After\n")
    write_markdown(readme, "## Performance\n\nnew table\n")
    assert readme.read_text() == f"# Title\n\nintro\n\n{SECTION_START}\n## Performance\n\nnew table\n{SECTION_END}\n\n## After\n"
    plain = tmp_path / "perf.md"
    write_markdown(plain, "## Performance\n")
    assert plain.read_text() == "## Performance\n"


def test_outside_a_source_checkout_the_command_says_it_needs_one(tmp_path, monkeypatch):
    """An installed wheel has no bench/ beside miles_envs/: simulated by pointing BENCH_DIR elsewhere."""
    from miles_envs import benchrun

    monkeypatch.setattr(benchrun, "BENCH_DIR", tmp_path / "bench")
    for args in (["bench", "--stored"], ["bench", "--quick", "--only", "search"]):
        result = CliRunner().invoke(bench_app(), args, env={"COLUMNS": "200"})
        assert result.exit_code == 1, result.output
        assert "source checkout's bench/ folder" in result.output and "pip install -e" in result.output
    assert not (tmp_path / "bench").exists()
