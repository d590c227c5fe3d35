"""The README's walkthrough runs as written, and its main job is the command whose results it reports."""

import importlib.util
import json
import re
import shlex

import click
import pytest
import typer.main

from miles_envs.cli.app import app
from tests.conftest import REPO, run_cli


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_write_your_own_env_walkthrough(tmp_path):
    env_file = next(b for b in blocks("python") if b.startswith("# my_env.py"))
    (tmp_path / "my_env.py").write_text(env_file)
    env = {"MILES_ENVS_HOME": str(tmp_path / "home")}
    commands = next(b for b in blocks("bash") if "miles-envs register" in b)
    for line in commands.splitlines():
        args = shlex.split(line.split("#")[0])
        assert args[0] == "miles-envs"
        run_cli(*args[1:], cwd=tmp_path, env=env)
    listed = run_cli("list", "--tag", "demo", cwd=tmp_path, env=env).stdout
    assert "demo/Countdown-v0" in listed


def main_job():
    """The README's set-up block: `cmd && cmd && ...` as lists of arguments."""
    block = next(b for b in blocks("bash") if "miles-envs train" in b and "init-model" in b)
    return [shlex.split(part) for part in block.replace("\\\n", " ").split("&&")]


def load_demo_lift():
    loader = importlib.util.spec_from_file_location("demo_lift", REPO / "bench" / "demo_lift.py")
    demo_lift = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(demo_lift)
    return demo_lift


def test_the_main_job_is_the_benchmarked_one_and_parses():
    demo_lift = load_demo_lift()
    commands = {args[1]: args for args in main_job() if args[0].endswith("miles-envs")}
    assert list(commands) == ["init-model", "train", "plot"]
    init, train, plot = commands["init-model"], commands["train"], commands["plot"]
    assert train[2] == demo_lift.ENV_ID
    model, out = train[train.index("--model") + 1], train[train.index("--out") + 1]
    assert init[2] == model and plot[2:] == [out]
    flags = train[3:]
    for option in ("--model", "--out"):
        i = flags.index(option)
        del flags[i:i + 2]
    assert tuple(flags) == demo_lift.MAIN_JOB_FLAGS  # the README shows the command whose results it reports
    group = typer.main.get_command(app)
    for args in (init, train, plot):  # every option exists and every value has its type
        command = group.get_command(click.Context(group), args[1])
        command.make_context(args[1], list(args[2:]))


def test_the_demo_results_section_is_the_bench_output_for_this_command():
    demo_lift = load_demo_lift()
    results = REPO / "bench" / "results" / "demo"
    summary = json.loads((results / "summary.json").read_text())
    assert " ".join(demo_lift.MAIN_JOB_FLAGS) in summary["command"]  # the stored results are this command's
    assert len(summary["runs"]) == 3 and {r["seed"] for r in summary["runs"]} == {0, 1, 2}
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(demo_lift.README_START), readme.index(demo_lift.README_END) + len(demo_lift.README_END)
    assert readme[start:end] == demo_lift.readme_section(summary)  # written by `python bench/demo_lift.py --stored`
    assert (results / demo_lift.PNG).read_bytes().startswith(b"\x89PNG")


def test_wilson_interval_matches_known_values():
    wilson = load_demo_lift().wilson
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
