"""Model commands: init-model (random-init checkpoints) and serve-engine (embedded engine over HTTP)."""

from __future__ import annotations

from pathlib import Path

import typer

from miles_envs.cli.common import console, fail


def register(app: typer.Typer) -> None:
    @app.command("init-model")
    def init_model_cmd(
        path: Path = typer.Argument(..., help="folder to write the checkpoint into"),
        arch: str = typer.Option("qwen3-moe", "--arch", help="qwen3-moe, qwen3 or deepseek-v3"),
        size: str = typer.Option("tiny", "--size", help="tiny or small (both run on CPU)"),
        mtp: int = typer.Option(0, "--mtp", min=0, help="MTP draft layers to add (DeepSeek-V3 NextN layout)"),
        tokenizer: str = typer.Option("qwen3", "--tokenizer", help="qwen3, qwen2_5, llama3 or deepseek_v3"),
        seed: int = typer.Option(0, "--seed"),
        context: int = typer.Option(4096, "--context", help="max_position_embeddings"),
    ) -> None:
        """Write a random-init checkpoint (config, safetensors, tokenizer, generation config)."""
        from miles_envs.models.factory import init_model

        try:
            with console.status(f"writing {arch}/{size} to {path}"):
                folder = init_model(path, arch=arch, size=size, mtp=mtp, tokenizer=tokenizer, seed=seed, context=context)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
        console.print(f"wrote {arch} ({size}, mtp={mtp}, tokenizer={tokenizer}) → [bold]{folder}[/]")

    @app.command("serve-engine")
    def serve_engine_cmd(
        path: Path = typer.Argument(..., help="checkpoint folder (e.g. from `miles-envs init-model`)"),
        port: int = typer.Option(30000, "--port", help="0 picks a free port"),
        host: str = typer.Option("127.0.0.1", "--host"),
        device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)"),
        draft_tokens: int = typer.Option(0, "--draft-tokens", min=0, help="speculative drafts per step (needs MTP)"),
        max_running: int = typer.Option(64, "--max-running", min=1, help="sequences decoded together"),
    ) -> None:
        """Serve a checkpoint with the embedded engine behind SGLang's native HTTP protocol."""
        from miles_envs.agents.embedded import EmbeddedEngine
        from miles_envs.agents.protocol_server import ProtocolServer
        from miles_envs.serving import run_forever
        from miles_envs.models.routing import moe_routers

        try:
            with console.status(f"loading {path}"):
                engine = EmbeddedEngine.from_path(path, device=device, draft_tokens=draft_tokens, max_running=max_running)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
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

        run_forever(server, lambda s: console.print(f"listening on {s.url}", highlight=False), on_stop=engine.close)
