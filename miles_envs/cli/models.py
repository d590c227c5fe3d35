"""Model commands: init-model (random-init checkpoints) and serve-engine (embedded engine over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from miles_envs.cli.common import (
    check_output_folder, clear_output_folder, console, fail, needs_extras, quiet_loaders, removed_on_failure, status,
)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(f"{option} {value!r} is not one of {', '.join(choices)}")


def holds_same_model(path: Path, settings: dict, context: int) -> bool:
    """Whether ``path`` already holds a finished checkpoint made with these settings (its record file
    is written last), so rerunning a command line keeps the model instead of refusing or rewriting."""
    try:
        stored = json.loads((path / "miles_envs_model.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return stored == settings and config.get("max_position_embeddings") == context


def register(app: typer.Typer) -> None:
    @app.command("init-model")
    def init_model_cmd(
        path: Path = typer.Argument(..., help="new (or empty) folder to write the checkpoint into"),
        arch: str = typer.Option("qwen3-moe", "--arch", help="qwen3-moe, qwen3 or deepseek-v3"),
        size: str = typer.Option("tiny", "--size", help="tiny or small (both run on CPU), or medium"),
        mtp: int = typer.Option(0, "--mtp", min=0, help="MTP draft layers to add (DeepSeek-V3 NextN layout)"),
        tokenizer: str = typer.Option("qwen3", "--tokenizer", help="qwen3, qwen2_5, llama3 or deepseek_v3"),
        seed: int = typer.Option(0, "--seed"),
        context: int = typer.Option(4096, "--context", min=16, help="max_position_embeddings"),
        force: bool = typer.Option(False, "--force", help="replace what PATH holds (a file, or a folder's contents)"),
    ) -> None:
        """Write a random-init checkpoint (config, safetensors, tokenizer, generation config)."""
        with needs_extras("init-model"):
            from miles_envs.models.factory import ARCHS, SIZES, TOKENIZERS, init_model
        check_choice("--arch", arch, ARCHS)
        check_choice("--size", size, SIZES)
        check_choice("--tokenizer", tokenizer, TOKENIZERS)
        settings = {"arch": arch, "size": size, "mtp": mtp, "tokenizer": tokenizer, "seed": seed}
        if not force and path.is_dir() and holds_same_model(path, settings, context):
            console.print(f"kept [bold]{path}[/]: it already holds this model ({arch}, {size}, mtp={mtp}, seed={seed}); --force rewrites it")
            return
        check_output_folder(path, "init-model PATH", force=force)
        if force:
            clear_output_folder(path)
        quiet_loaders()
        try:
            with status(f"writing {arch}/{size} to {path}"), removed_on_failure(path):
                folder = init_model(path, arch=arch, size=size, mtp=mtp, tokenizer=tokenizer, seed=seed, context=context)
        except (ValueError, OSError) as exc:
            fail(f"init-model {path}: {exc}")
        console.print(f"wrote {arch} ({size}, mtp={mtp}, tokenizer={tokenizer}) → [bold]{folder}[/]")

    @app.command("serve-engine")
    def serve_engine_cmd(
        path: Path = typer.Argument(..., help="checkpoint folder (e.g. from `miles-envs init-model`)"),
        port: int = typer.Option(30000, "--port", min=0, max=65535, help="0 picks a free port"),
        host: str = typer.Option("127.0.0.1", "--host"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)"),
        draft_tokens: int = typer.Option(0, "--draft-tokens", min=0, help="speculative drafts per step (needs MTP)"),
        max_running: int = typer.Option(64, "--max-running", min=1, help="sequences decoded together"),
    ) -> None:
        """Serve a checkpoint with the embedded engine behind SGLang's native HTTP protocol."""
        from miles_envs.cli.wiring import check_model_folder

        try:
            check_model_folder(path, "serve-engine PATH")
        except ValueError as exc:
            fail(str(exc))
        if device is not None:
            check_choice("--device", device.split(":")[0], ("cpu", "cuda"))
        with needs_extras("serve-engine"):
            import torch

            from miles_envs.agents.embedded import EmbeddedEngine
            from miles_envs.agents.protocol_server import ProtocolServer
            from miles_envs.models.routing import moe_routers
            from miles_envs.serving import run_forever
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {device}: no CUDA device is visible; use --device cpu")
        quiet_loaders()
        try:
            with status(f"loading {path}"):
                engine = EmbeddedEngine.from_path(path, device=device, draft_tokens=draft_tokens, max_running=max_running)
        except (ValueError, OSError) as exc:
            fail(f"serve-engine {path}: {exc}")
        config = engine.model.config
        server = ProtocolServer(
            engine,
            host=host,
            port=port,
            context_length=engine.checkpoint.context_length,
            model_path=str(engine.checkpoint.path),
            weight_version=engine.weight_version,
            routing_shape=(config.num_hidden_layers, config.num_experts_per_tok) if moe_routers(engine.model) else None,
        )

        try:
            run_forever(server, lambda s: console.print(f"listening on {s.url}", highlight=False), on_stop=engine.close)
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port (0 picks a free one)")
