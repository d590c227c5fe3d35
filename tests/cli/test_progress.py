"""Progress without a terminal: plain lines a log file keeps, instead of a live bar it never shows."""

import io
import threading

from rich.console import Console
from rich.progress import Progress

from miles_envs.cli.common import PlainProgress, make_progress, status
from miles_envs.trajectory import Status, Trajectory
from tests.conftest import run_cli


def plain_console() -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    return Console(file=stream, width=200), stream


def test_plain_progress_prints_a_line_per_interval_and_the_final_count():
    console, stream = plain_console()
    with PlainProgress(console, interval=0) as progress:
        task = progress.add_task("episodes", total=4, rate="")
        for done in range(4):
            progress.update(task, advance=1, rate=f"{done + 1}.0 ep/s")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].startswith("episodes: 4/4 (100%)") and lines[-1].endswith("4.0 ep/s")


def test_plain_progress_holds_lines_back_until_the_interval_and_always_reports_the_end():
    console, stream = plain_console()
    with PlainProgress(console, interval=3600) as progress:
        steps = progress.add_task("RL", total=None)
        for _ in range(50):
            progress.advance(steps)
        hidden = progress.add_task("warm start", total=5, visible=False)
        progress.update(hidden, completed=5)
    # the first update prints, then nothing for an hour; leaving prints the count reached; hidden tasks never
    assert [line.split(" ")[:2] for line in stream.getvalue().splitlines()] == [["RL:", "1"], ["RL:", "50"]]


def test_make_progress_picks_a_bar_only_on_a_terminal():
    console, _ = plain_console()
    assert isinstance(make_progress(console=console), PlainProgress)
    assert isinstance(make_progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress)


def test_plain_status_prints_its_message_changes_and_a_heartbeat(monkeypatch):
    monkeypatch.setenv("MILES_ENVS_PROGRESS_INTERVAL", "0.01")
    console, stream = plain_console()
    beat = threading.Event()
    with status("loading model", console=console) as running:
        running.update("running bench/search.py")
        while "still running" not in stream.getvalue():
            beat.wait(0.01)
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["loading model", "running bench/search.py"]
    assert lines[2].startswith("running bench/search.py (still running, ")


def test_a_command_writing_to_a_log_file_reports_progress_lines(tmp_path):
    episode = Trajectory(prompt_ids=[1, 2], response_ids=[3], loss_mask=[1], logprobs=[-0.5], status=Status.COMPLETED)
    (tmp_path / "run.jsonl").write_text((episode.to_json() + "\n") * 3)
    result = run_cli("view", "run.jsonl", cwd=tmp_path, env={"MILES_ENVS_PROGRESS_INTERVAL": "0"})
    assert "encoding episodes: 3/3 (100%)" in result.stderr  # stderr is a pipe here, as in CI or a cluster job
    assert "wrote run.html: 3 episodes" in " ".join(result.stdout.split())
