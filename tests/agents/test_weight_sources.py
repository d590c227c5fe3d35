"""Typed weight sources: each engine takes the kinds it declares and names them when handed another."""

import json

import pytest
import torch
from aiohttp import web

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.sglang import SGLangEngine
from miles_envs.engine import SamplingParams
from miles_envs.models.loading import load_checkpoint
from miles_envs.session import RolloutSession, SessionConfig
from miles_envs.weight_sync import (
    BroadcastGroup,
    CheckpointFolder,
    Tensors,
    WeightSourceNotAccepted,
    weight_source,
)
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

STATE = {"lm_head.weight": torch.zeros(4, 2, dtype=torch.bfloat16), "norm.weight": torch.ones(2)}


@pytest.fixture
async def server(qwen3):
    async with ProtocolServer(ScriptedEngine(qwen3, ["ok"]), context_length=256) as srv:
        yield srv


async def test_sglang_refuses_in_memory_tensors_and_posts_nothing(server):
    async with SGLangEngine(server.url, context_length=256) as client:
        for source in (STATE, Tensors(STATE)):
            with pytest.raises(WeightSourceNotAccepted) as raised:
                await client.update_weights(source, version="step-1")
            message = str(raised.value)
            assert "SGLangEngine cannot take 2 in-memory tensors (kind 'tensors')" in message
            assert "it accepts 'broadcast', 'folder'" in message and "CheckpointFolder(path)" in message
        info = await client.server_info()
        assert (info["model_path"], info["weight_version"]) == ("scripted", "default")
        assert (await client.generate([1, 2], SamplingParams())).weight_version == "0"  # the served engine's, untouched
        await client.update_weights(CheckpointFolder("/ckpt/step-2"), version="step-2")
        assert (await client.server_info())["model_path"] == "/ckpt/step-2"
        assert (await client.generate([1, 2], SamplingParams())).weight_version == "step-2"


async def test_a_session_refuses_a_wrong_kind_before_pausing_anything(server):
    async with SGLangEngine(server.url, context_length=256) as client:
        session = RolloutSession(client, SessionConfig(update_policy="drain"))
        with pytest.raises(WeightSourceNotAccepted, match="kind 'tensors'"):
            await session.update_weights(STATE, version="step-1")
        assert session.stats.updates == 0 and session._open.is_set()
        await session.update_weights("/ckpt/step-1", version="step-1")
        assert session.stats.updates == 1 and (await client.server_info())["weight_version"] == "step-1"


async def test_sglang_announces_a_broadcast_in_its_distributed_update_wire_shape(unused_tcp_port):
    received = []

    async def update(request):
        received.append((request.path, json.loads(await request.read())))
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    app = web.Application()
    app.router.add_post("/update_weights_from_distributed", update)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        async with SGLangEngine(f"http://127.0.0.1:{unused_tcp_port}", context_length=256) as client:
            await client.update_weights(BroadcastGroup.of(STATE, group_name="miles-0"), version="step-3")
            assert client.weight_version == "step-3"
    finally:
        await runner.cleanup()
    assert received == [("/update_weights_from_distributed", {
        "names": ["lm_head.weight", "norm.weight"], "dtypes": ["bfloat16", "float32"], "shapes": [[4, 2], [2]],
        "group_name": "miles-0", "flush_cache": True, "weight_version": "step-3",
    })]


async def test_embedded_takes_tensors_and_folders_but_not_a_broadcast(tiny_checkpoint):  # noqa: F811
    folder = tiny_checkpoint("qwen3")
    engine = EmbeddedEngine.from_path(folder, device="cpu")
    try:
        state = load_checkpoint(folder, device="cpu").model.state_dict()
        await engine.update_weights(Tensors(state), version="1")
        await engine.update_weights(CheckpointFolder(folder), version="2")
        assert (await engine.generate([9707, 1879], SamplingParams(max_new_tokens=2))).weight_version == "2"
        with pytest.raises(WeightSourceNotAccepted, match=r"EmbeddedEngine cannot take a broadcast of \d+ tensors .*accepts 'folder', 'tensors'"):
            await engine.update_weights(BroadcastGroup.of(state), version="3")
        assert engine.weight_version == "2"
    finally:
        await engine.close()


def test_raw_values_map_to_kinds_and_anything_else_is_refused(tmp_path):
    assert weight_source({"w": torch.zeros(1)}).kind == "tensors"
    assert weight_source(tmp_path) == CheckpointFolder(str(tmp_path))
    assert weight_source("/ckpt").kind == "folder"
    with pytest.raises(WeightSourceNotAccepted, match="cannot update weights from a int"):
        weight_source(3)
    with pytest.raises(ValueError, match="2 names, 1 dtypes, 2 shapes"):
        BroadcastGroup(("a", "b"), ("float32",), ((1,), (2,)))
