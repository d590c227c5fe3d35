"""The protocol server's wire format checked with a plain HTTP client, independent of SGLangEngine."""

import base64

import httpx
import numpy as np
import pytest

from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine, SyntheticRouting

ROUTING = SyntheticRouting(num_layers=3, topk=2, num_experts=6)


@pytest.fixture
async def http(qwen3):
    engine = ScriptedEngine(qwen3, ["Hello world"], routing=ROUTING)
    async with ProtocolServer(engine, context_length=256, routing_shape=(3, 2)) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            yield server, client


async def test_generate_response_follows_sglang_meta_info(http):
    _, client = http
    body = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 8},
        "return_logprob": True,
        "return_routed_experts": True,
        "routed_experts_start_len": 1,
        "rid": "abc",
    }
    response = (await client.post("/generate", json=body)).json()
    meta = response["meta_info"]
    assert response["output_ids"] == [9707, 1879, 151645]
    assert meta["id"] == "abc" and meta["finish_reason"] == {"type": "stop", "matched": 151645}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (3, 3, 0)
    assert [entry[1] for entry in meta["output_token_logprobs"]] == [9707, 1879, 151645]
    assert all(len(entry) == 3 and entry[0] < 0 for entry in meta["output_token_logprobs"])
    flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype="<i4")
    processed = [6, 7, 9707, 1879]  # positions 1..4: from routed_experts_start_len to seqlen - 1
    np.testing.assert_array_equal(flat.reshape(4, 3, 2), ROUTING.rows(np.array(processed), np.arange(1, 5)))
    assert "routed_experts_start_len" not in meta  # not echoed back


async def test_length_finish_reports_the_limit(http):
    _, client = http
    response = (await client.post("/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})).json()
    assert response["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
    assert "routed_experts" not in response["meta_info"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": "hi"}, "token ids only"),
        ({"input_ids": [1, 2], "return_routed_experts": True, "routed_experts_start_len": 3}, "must be in [0, 2]"),
        ({"input_ids": [1] * 250, "sampling_params": {"max_new_tokens": 10}}, "maximum context length of 256"),
        ({"input_ids": [1], "lora_path": "nope"}, "not loaded"),
    ],
)
async def test_bad_generate_requests_are_400_with_a_message(http, body, message):
    _, client = http
    response = await client.post("/generate", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


async def test_malformed_request_json_unknown_paths_and_methods(http):
    _, client = http
    bad = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]["message"]
    assert (await client.get("/nope")).status_code == 404
    assert (await client.get("/generate")).status_code == 405


async def test_admin_endpoints(http):
    server, client = http
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/health_generate")).status_code == 200
    info = (await client.get("/get_server_info")).json()
    assert (info["context_length"], info["num_hidden_layers"], info["num_experts_per_tok"]) == (256, 3, 2)
    assert (await client.get("/v1/models")).json()["data"][0]["max_model_len"] == 256
    assert (await client.post("/flush_cache")).status_code == 200
    loaded = await client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"})
    assert loaded.json()["loaded_adapters"] == {"a": "/p"}
    assert (await client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"})).status_code == 400
    update = await client.post("/update_weights_from_disk", json={"model_path": "/ckpt", "weight_version": "7"})
    assert update.json()["success"] is True and server.weight_version == "7"
    assert (await client.post("/update_weights_from_disk", json={})).status_code == 400
    assert (await client.post("/pause_generation", json={"mode": "sideways"})).status_code == 400
    assert (await client.post("/pause_generation", json={"mode": "retract"})).json()["status"] == "ok"
    assert (await client.post("/continue_generation", json={})).json()["status"] == "ok"
    assert (await client.post("/abort_request", json={"rid": "unknown"})).status_code == 200


def test_serves_from_a_thread_for_synchronous_callers(qwen3):
    with ProtocolServer(ScriptedEngine(qwen3, ["Hello world"])).running_in_thread() as server:
        response = httpx.post(f"{server.url}/generate", json={"input_ids": [1], "return_logprob": True})
        assert response.json()["output_ids"] == [9707, 1879, 151645]
