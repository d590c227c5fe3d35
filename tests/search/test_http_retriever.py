"""Search-R1 ``/retrieve``: the client against a real server on 127.0.0.1."""

import json

import httpx
import pytest

from miles_envs.checker import check_env
from miles_envs.envs.search_env import BUILTIN_CORPUS, SearchEnv
from miles_envs.search.bm25 import BM25Index
from miles_envs.search.documents import read_corpus
from miles_envs.search.http_retriever import HTTPRetriever, serve


@pytest.fixture(scope="module")
def index():
    return BM25Index.build(read_corpus(BUILTIN_CORPUS))


@pytest.fixture
def server(index):
    running = serve(index.query, port=0)
    host, port = running.server_address[:2]
    yield f"http://{host}:{port}/retrieve"
    running.shutdown()


def test_server_speaks_search_r1_format(server):
    with_scores = httpx.post(server, json={"queries": ["Mount Bedrai height"], "topk": 2, "return_scores": True}).json()
    [[first, second]] = with_scores["result"]
    assert set(first) == {"document", "score"} and first["score"] >= second["score"]
    assert first["document"]["contents"] == f'{first["document"]["title"]}\n{first["document"]["text"]}'
    plain = httpx.post(server, json={"queries": ["Mount Bedrai height"], "topk": 2}).json()
    assert plain["result"] == [[first["document"], second["document"]]]
    assert httpx.post(server, json={"topk": 2}).status_code == 400
    assert httpx.post(server.replace("/retrieve", "/search"), json={}).status_code == 404


async def test_client_returns_what_the_local_index_returns(server, index):
    client = HTTPRetriever(server)
    queries = ["Who founded the town of Caithun?", "leazul lamp inventor", "nothing matches qqqq"]
    remote = await client.search(queries, 3)
    await client.aclose()
    assert [[d.id for d in hits] for hits in remote] == [[d.id for d in hits] for hits in index.query(queries, 3)]
    assert [[d.text for d in hits] for hits in remote] == [[d.text for d in hits] for hits in index.query(queries, 3)]
    assert remote[2] == []


def test_search_env_over_http_matches_the_builtin_backend(server):
    action = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "q", "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": "leazul lamp"})}}
    ]}
    local, remote = SearchEnv(), SearchEnv(retriever_url=server)
    assert local.reset(seed=1) == remote.reset(seed=1)
    assert local.step(action) == remote.step(action)
    check_env(remote, policy=lambda history: action if len(history) < 4 else {"role": "assistant", "content": "<answer>x</answer>"})
    remote.close()
