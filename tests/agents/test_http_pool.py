import asyncio

from miles_envs.agents.http_pool import ConnectionPool, Response, _Deliveries
from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine, ScriptedReply


async def test_a_burst_of_responses_wakes_its_requests_a_bounded_number_per_loop_pass():
    loop = asyncio.get_running_loop()
    deliveries = _Deliveries(per_pass=8)
    waiters = [loop.create_future() for _ in range(30)]
    for i, waiter in enumerate(waiters):  # one selector pass that read thirty responses
        deliveries.put(waiter, Response(200, str(i).encode()))
    done_after_each_pass = []
    while len(done_after_each_pass) < 6:
        await asyncio.sleep(0)
        done_after_each_pass.append(sum(w.done() for w in waiters))
    assert done_after_each_pass[0] <= 8 and done_after_each_pass[-1] == 30
    assert all(b - a <= 8 for a, b in zip(done_after_each_pass, done_after_each_pass[1:]))
    assert [w.result().content for w in waiters] == [str(i).encode() for i in range(30)]


async def test_a_timed_out_request_is_skipped_when_its_response_comes_out_of_the_queue():
    loop = asyncio.get_running_loop()
    deliveries = _Deliveries(per_pass=8)
    expired, live = loop.create_future(), loop.create_future()
    expired.set_exception(TimeoutError("deadline"))
    deliveries.put(expired, Response(200, b"late"))
    deliveries.put(live, Response(200, b"ok"))
    assert (await live).content == b"ok"
    assert isinstance(expired.exception(), TimeoutError)


async def test_a_cold_start_opens_connections_a_few_at_a_time_and_serves_everyone(qwen3):
    engine = ScriptedEngine(qwen3, lambda context: ScriptedReply("ok"))
    async with ProtocolServer(engine, latency_s=0.01) as server:
        pool = ConnectionPool(server.url, max_connections=40, connect_concurrency=3)
        connecting, most = 0, 0
        loop = asyncio.get_running_loop()
        create_connection = loop.create_connection

        async def counted(*args, **kwargs):
            nonlocal connecting, most
            connecting += 1
            most = max(most, connecting)
            try:
                return await create_connection(*args, **kwargs)
            finally:
                connecting -= 1

        loop.create_connection = counted  # the real connect, counted
        try:
            responses = await asyncio.gather(*(pool.request("GET", "/health", timeout=10) for _ in range(100)))
        finally:
            del loop.create_connection
            await pool.aclose()
    assert [r.status_code for r in responses] == [200] * 100
    assert 1 <= most <= 3
