"""Engine and renderer construction from command-line specs (shared by rollout, train and the serve
commands). Every spec is checked before anything heavy loads, so a typo fails in milliseconds with
the fix, not after a model load or a wait on an unreachable model hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miles_envs.cli.common import missing_extra, quiet_loaders

DEFAULT_TOKENIZER = "qwen3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_tokenizer(name_or_path: str) -> str:
    """A known short name, or a folder holding tokenizer files; nothing is looked up online."""
    from miles_envs.tokenizers import KNOWN

    if name_or_path in KNOWN:
        return name_or_path
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"--tokenizer {name_or_path!r} is neither a known name nor a folder: "
            f"give one of {', '.join(KNOWN)} or a local folder with tokenizer files"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"--tokenizer {folder}: the folder holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return str(folder)


def check_model_folder(path: str | Path, what: str) -> Path:
    """A local Hugging Face checkpoint folder (``config.json`` inside), else a ValueError saying so."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"{what} {folder} does not exist; create one with `miles-envs init-model {folder}`")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{what} {folder} has no config.json: give a checkpoint folder (e.g. from `miles-envs init-model`)")
    return folder


def check_engine_spec(engine_spec: str) -> None:
    """Checks a spec's local parts (the ``embedded:PATH`` folder) before any tokenizer or model loads."""
    kind, _, rest = engine_spec.partition(":")
    if kind == "embedded":
        if not rest:
            raise ValueError("--engine embedded needs a model folder: embedded:PATH")
        check_model_folder(rest, "--engine embedded: model folder")


def load_checked_tokenizer(name_or_path: str):
    """``load_tokenizer`` after ``resolve_tokenizer``; a missing extra is named with its pip command."""
    from miles_envs.tokenizers import load_tokenizer

    path = resolve_tokenizer(name_or_path)
    try:
        return load_tokenizer(path)
    except ImportError as error:
        raise ImportError(missing_extra(error) or str(error)) from error
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {name_or_path}: cannot load it ({error})") from error


def build_renderer(engine_spec: str, tokenizer: str | None):
    """The chat renderer for the engine's tokenizer: an embedded model's own, else ``tokenizer``."""
    check_engine_spec(engine_spec)
    if tokenizer is None and engine_spec.startswith("embedded:"):
        tokenizer = engine_spec.split(":", 1)[1]
    loaded = load_checked_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    from miles_envs.chat import ChatRenderer

    return ChatRenderer(loaded)


def build_engine(engine_spec: str, tokenizer: Any, script: Path | None = None):
    from miles_envs.agents.factory import make_engine

    replies = None
    if script is not None:
        try:
            replies = json.loads(Path(script).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"--script {script}: cannot read it as JSON ({error})") from error
        if not isinstance(replies, list) or not replies or not all(isinstance(r, str) for r in replies):
            raise ValueError(f"{script}: the script must be a non-empty JSON list of reply strings")
    quiet_loaders()  # an embedded model's loading bars would interleave with the command's own
    try:
        return make_engine(engine_spec, tokenizer=tokenizer, replies=replies)
    except ImportError as error:
        raise ImportError(missing_extra(error) or str(error)) from error
