"""Record a Tavily session, then replay it byte-identically with the network unreachable.

Tavily's cloud cannot be reached from CI, so recording runs against a stand-in server on 127.0.0.1
that speaks Tavily's ``POST /search`` (the only mocked part); replay never opens a socket.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from miles_envs.envs.search_env import SearchEnv
from miles_envs.search.cassette import CassetteMiss
from miles_envs.search.web import TavilySearch


class StandInTavily(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandInTavily.requests.append((self.path, self.headers.get("Authorization"), body))
        results = [
            {"title": f"{body['query']} — result {rank}", "url": f"https://example.org/{rank}",
             "content": f"Snippet {rank} about {body['query']} ✓", "score": round(1 - rank / 10, 3)}
            for rank in range(body["max_results"])
        ]
        data = json.dumps({"query": body["query"], "results": results, "response_time": 0.42}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def tavily_url():
    StandInTavily.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInTavily)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


QUERIES = ["capital of Veloria", "tallest mountain", "capital of Veloria"]


async def search_all(client):
    first = await client.search(QUERIES[:2], 3)
    second = await client.search(QUERIES[2:], 3)
    await client.aclose()
    return first + second


async def test_recorded_session_replays_byte_identically_offline(tavily_url, tmp_path, monkeypatch, request):
    cassette = tmp_path / "tavily.json"
    recorder = TavilySearch(api_key="tvly-secret", cassette=cassette, mode="record", base_url=tavily_url)
    recorded = await search_all(recorder)
    # The repeated query was answered from the cassette, not sent again; the key went out but was not stored.
    # (The first two queries are sent concurrently, so they may arrive in either order.)
    assert sorted(request[2]["query"] for request in StandInTavily.requests) == sorted(QUERIES[:2])
    assert {request[1] for request in StandInTavily.requests} == {"Bearer tvly-secret"}
    stored = cassette.read_bytes()
    assert b"tvly-secret" not in stored
    assert recorded[0][0].title == "capital of Veloria — result 0" and recorded[0][0].text.endswith("✓")

    request.getfixturevalue("no_network")
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    replayer = TavilySearch(cassette=cassette, base_url=tavily_url)
    replayed = await search_all(replayer)
    assert replayed == recorded
    assert cassette.read_bytes() == stored

    raw = await TavilySearch(cassette=cassette, base_url=tavily_url)._client.get().post(
        "/search", json={"query": QUERIES[0], "max_results": 3, "search_depth": "basic"}
    )
    [interaction] = [i for i in json.loads(stored)["interactions"] if json.loads(i["request"]["body"])["query"] == QUERIES[0]]
    assert raw.content == interaction["response"]["body"].encode()

    with pytest.raises(CassetteMiss, match="no recorded response for POST"):
        await TavilySearch(cassette=cassette, base_url=tavily_url).search(["never recorded"], 3)


def test_search_env_episode_replays_identically_offline(tavily_url, tmp_path, monkeypatch, request):
    cassette = tmp_path / "env.json"
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-env")
    monkeypatch.setenv("TAVILY_BASE_URL", tavily_url)
    action = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "w", "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": "Veloria"})}}
    ]}

    def episode(**backend):
        env = SearchEnv(web="tavily", cassette=cassette, **backend)
        trace = [env.reset(seed=5), env.step(action), env.step({"role": "assistant", "content": "<answer>x</answer>"})]
        env.close()
        return trace

    recorded = episode(cassette_mode="record")
    assert "Snippet 0 about Veloria" in recorded[1][0][0]["content"]
    request.getfixturevalue("no_network")
    monkeypatch.delenv("TAVILY_API_KEY")
    assert episode() == recorded


def test_recording_needs_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    with pytest.raises(ValueError, match="set TAVILY_API_KEY"):
        TavilySearch(cassette=tmp_path / "c.json", mode="record")
    with pytest.raises(FileNotFoundError, match="record one first"):
        TavilySearch(cassette=tmp_path / "missing.json")
