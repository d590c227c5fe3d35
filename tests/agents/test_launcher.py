"""Launcher: SGLang command line, and a real child server started, health-checked and stopped."""

import socket
import sys

import httpx
import pytest

from miles_envs.agents.launcher import (
    ServerProcess,
    ServerStartError,
    SGLangServerConfig,
    launch_sglang,
    sglang_available,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_carries_routing_speculative_and_lora_flags():
    config = SGLangServerConfig(
        "/models/qwen3-moe",
        port=31000,
        tp_size=2,
        context_length=8192,
        return_routed_experts=True,
        speculative_algorithm="NEXTN",
        speculative_num_steps=3,
        speculative_eagle_topk=1,
        speculative_num_draft_tokens=4,
        lora_paths={"math": "/adapters/math"},
        max_lora_rank=16,
        extra_args=["--disable-radix-cache"],
    )
    cmd = config.command(python="python")
    assert cmd[:5] == ["python", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-moe"]
    joined = " ".join(cmd)
    for part in (
        "--port 31000", "--tp-size 2", "--context-length 8192", "--enable-return-routed-experts",
        "--speculative-algorithm NEXTN", "--speculative-num-steps 3", "--speculative-eagle-topk 1",
        "--speculative-num-draft-tokens 4", "--enable-lora --lora-paths math=/adapters/math",
        "--max-lora-rank 16",
    ):
        assert part in joined
    assert cmd[-1] == "--disable-radix-cache"
    assert "--mem-fraction-static" not in cmd
    assert config.base_url == "http://127.0.0.1:31000"


@pytest.mark.skipif(sglang_available(), reason="sglang is installed here")
def test_launch_without_sglang_says_how_to_install():
    with pytest.raises(ServerStartError, match=r"pip install 'miles-envs\[sglang\]'"):
        launch_sglang(SGLangServerConfig("/models/x"))


def test_child_server_is_started_waited_for_and_stopped(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "miles_envs.agents.protocol_server", "--port", str(port), "--reply", "Hello world"]
    with ServerProcess(command, f"{url}/health", log_path=tmp_path / "server.log") as server:
        assert server.running
        response = httpx.post(f"{url}/generate", json={"input_ids": [1], "return_logprob": True}).json()
        assert response["output_ids"] == [9707, 1879, 151645]
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    assert f"listening on {url}" in (tmp_path / "server.log").read_text()


def test_a_server_that_dies_at_start_reports_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)"]
    server = ServerProcess(command, "http://127.0.0.1:9/health", log_path=tmp_path / "log")
    with pytest.raises(ServerStartError, match=r"(?s)code 3.*bad flag --frobnicate"):
        server.start(timeout=60)
    assert not server.running
