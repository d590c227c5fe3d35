"""What every command shares: consoles, the one way to fail (a red line on stderr, exit 1), checks
made before any work starts (writable outputs, installed extras), quiet third-party loaders, and
progress that still reports when stderr is a log file rather than a terminal."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print ``message`` (plain text: brackets such as ``[embedded]`` are kept) and exit with status 1."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, emoji=False)
    raise typer.Exit(1)


# -- outputs ----------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _probe_writable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (None when something can): tried, not guessed from
    permission bits, which root ignores and /proc or read-only mounts do not show."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or str(error)


def check_output_file(path: Path, option: str) -> None:
    """Fail unless ``path`` can be written as a file; creates nothing."""
    if path.is_dir():
        fail(f"{option} {path} is a folder: give a file path")
    _check_creatable(path.parent, path, option)


def check_output_folder(path: Path, option: str, *, force: bool = False) -> None:
    """Fail unless ``path`` can become a fresh output folder; something already there needs ``force``."""
    if path.is_file() or path.is_symlink():
        if not force:
            fail(f"{option} {path} is a file; choose a new folder, or pass --force to replace it")
    elif path.is_dir():
        if any(path.iterdir()) and not force:
            fail(f"{option} {path} is not empty; choose a new folder, or pass --force to replace its contents")
        here = Path.cwd().resolve()
        if force and (path.resolve() in (here, *here.parents, Path.home().resolve())):
            fail(f"{option} {path} holds the working directory (or is your home); --force empties only a folder of its own")
        _check_creatable(path, path, option)
        return
    _check_creatable(path.parent, path, option)


def _check_creatable(folder: Path, target: Path, option: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        fail(f"{option} {target}: {existing} is a file, not a folder; choose another path")
    problem = _probe_writable(existing)
    if problem is not None:
        fail(f"{option} {target}: cannot write under {existing} ({problem}); choose another path")


def clear_output_folder(path: Path) -> None:
    """Remove what ``--force`` allowed to replace (a file or a folder's contents), keeping the folder."""
    if path.is_file() or path.is_symlink():
        path.unlink()
    elif path.is_dir():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


@contextlib.contextmanager
def removed_on_failure(path: Path, *, make_parent: bool = False) -> Iterator[None]:
    """For a block that writes ``path`` anew (absent, an empty folder, or a file it replaces): if the
    block fails, nothing it wrote stays. Folders made for it go; a folder that existed is kept, empty.
    ``make_parent`` creates the missing folders above a file first."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    existed_as_folder = path.is_dir()
    try:
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        made = missing[-1] if missing else None
        if made is not None and made.is_dir():
            shutil.rmtree(made, ignore_errors=True)
        elif existed_as_folder:
            clear_output_folder(path)
        else:
            path.unlink(missing_ok=True)
        raise


# -- optional dependencies --------------------------------------------------------------------------

#: import name of an optional dependency → the extra that installs it
EXTRAS = {
    "transformers": "tokenizers", "tokenizers": "tokenizers", "jinja2": "tokenizers", "tiktoken": "tokenizers",
    "torch": "embedded", "safetensors": "embedded", "pyarrow": "parquet", "peft": "train",
    "tensorboard": "train", "wandb": "wandb", "megatron": "megatron", "sglang": "sglang", "ray": "ray",
    "docker": "docker", "e2b_code_interpreter": "e2b", "bm25s": "search", "Stemmer": "search",
    "starlette": "serve", "uvicorn": "serve", "uvloop": "serve", "matplotlib": "train",
}


def missing_extra(error: ImportError) -> str | None:
    """``pip install 'miles-envs[EXTRA]'`` advice when ``error`` is a missing optional dependency."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name not in EXTRAS:  # libraries also raise plain ImportErrors that name what they lack
        name = next((m for m in EXTRAS if re.search(rf"\b{re.escape(m)}\b", str(error))), "")
    if not name:
        return None
    return f"{name} is not installed: pip install 'miles-envs[{EXTRAS[name]}]'"


@contextlib.contextmanager
def needs_extras(what: str) -> Iterator[None]:
    """Turn a missing optional dependency inside the block into a one-line error naming the extra."""
    try:
        yield
    except ImportError as error:
        advice = missing_extra(error)
        if advice is None:
            raise
        fail(f"{what} needs an optional dependency: {advice}")


def quiet_loaders() -> None:
    """Silence transformers' and huggingface_hub's own loading/saving bars, which would interleave
    with ours; their warnings stay."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# -- progress ---------------------------------------------------------------------------------------

PROGRESS_INTERVAL_ENV = "MILES_ENVS_PROGRESS_INTERVAL"


def progress_interval() -> float:
    """Seconds between plain progress lines (``$MILES_ENVS_PROGRESS_INTERVAL``, default 30)."""
    return float(os.environ.get(PROGRESS_INTERVAL_ENV, "30"))


class PlainProgress:
    """The part of ``rich.progress.Progress`` commands use, for a stderr that is not a terminal (a
    log file, CI, a cluster job): a plain line per task at most every ``interval`` seconds and when
    the task finishes, instead of a live bar that such a stream would never show."""

    def __init__(self, console: Console, interval: float | None = None) -> None:
        self.console = console
        self.interval = progress_interval() if interval is None else interval
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():
            if task["visible"] and task["printed"] != task["completed"]:
                self._line(task_id)

    def add_task(self, description: str, total: float | None = None, *, visible: bool = True, completed: float = 0, **fields: Any) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = {
            "description": description, "total": total, "completed": completed, "visible": visible,
            "fields": fields, "start": time.monotonic(), "last": float("-inf"), "printed": None,
        }
        return task_id

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               description: str | None = None, visible: bool | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        task["completed"] = task["completed"] + advance if completed is None else completed
        for key, value in (("total", total), ("description", description), ("visible", visible)):
            if value is not None:
                task[key] = value
        task["fields"].update(fields)
        finished = task["total"] is not None and task["completed"] >= task["total"]
        if task["visible"] and (finished or time.monotonic() - task["last"] >= self.interval):
            self._line(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task_id: int) -> None:
        task = self.tasks[task_id]
        done, total = task["completed"], task["total"]
        count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
        info = " ".join(str(v) for v in task["fields"].values() if v not in ("", None))
        elapsed = time.monotonic() - task["start"]
        self.console.print(f"{task['description']}: {count} {elapsed:.0f}s {info}".rstrip(), highlight=False, markup=False)
        task["last"], task["printed"] = time.monotonic(), done


def make_progress(*columns: Any, console: Console = err, transient: bool = False):
    """A rich progress bar on a terminal, else a ``PlainProgress`` with the same calls."""
    from rich.progress import Progress

    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return PlainProgress(console)


def track(items: Any, description: str, *, total: float | None = None, console: Console = err) -> Iterator[Any]:
    """Yield ``items`` with a bar on a terminal (removed when done), plain lines elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with make_progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=len(items) if total is None else total)
        for item in items:
            yield item
            progress.update(task, advance=1)


class _PlainStatus:
    """A spinner's message as plain lines: when it starts or changes, then every interval while it lasts."""

    def __init__(self, console: Console, message: str, interval: float) -> None:
        self.console, self.message, self.interval = console, message, interval
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> _PlainStatus:
        self._print()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, message: str) -> None:
        self.message, self.start = message, time.monotonic()
        self._print()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            self._print(f" (still running, {time.monotonic() - self.start:.0f}s)")

    def _print(self, suffix: str = "") -> None:
        self.console.print(f"{self.message}{suffix}", highlight=False, markup=False)


def status(message: str, console: Console = err):
    """A spinner on a terminal; plain lines (start, changes, a heartbeat) anywhere else."""
    if console.is_terminal:
        return console.status(message)
    return _PlainStatus(console, message, progress_interval())


# -- help -------------------------------------------------------------------------------------------


def show_flags_bare() -> None:
    """typer's rich help labels on/off flags ``<bool>`` as if they took a value; show them bare."""
    from typer.core import TyperOption

    labelled = getattr(TyperOption, "display_type_rich", None)
    if labelled is None or getattr(labelled, "flags_bare", False):  # a typer without this hook draws its own help
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else labelled(self, ctx)

    display_type_rich.flags_bare = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
