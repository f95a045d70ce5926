"""The front door, in-process: nothing costly happens before the key and the size are checked.

Each test runs the wrapper as `app/serve.py` builds it, in front of
`tests.fake_engine.FakeEngine` (a stand-in for the engine that records every
request it receives, so "nothing reached the engine" is a fact, not a guess).
Raw sockets play the clients that a normal HTTP library would not be: one
that uploads without end, one that trickles its headers or body.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import httpx
import pytest

from tests.fake_engine import SERVED_NAME, FakeEngine
from tests.inprocess import Wrapper, running_wrapper

KEY = "door-key"
CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
MiB = 1024 * 1024


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def open_raw(wrapper: Wrapper) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", wrapper.port)


async def read_response(reader: asyncio.StreamReader, timeout_s: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def upload_until_refused(
    wrapper: Wrapper, path: str, headers: str, total_bytes: int
) -> tuple[int, dict[str, str], bytes, int]:
    """Send a chunked body of up to `total_bytes` while watching for the answer; returns it and the bytes sent."""
    reader, writer = await open_raw(wrapper)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{headers}\r\n".encode())
    answer = asyncio.ensure_future(read_response(reader))
    chunk = b"%x\r\n%s\r\n" % (MiB, b"x" * MiB)
    sent = 0
    try:
        while sent < total_bytes and not answer.done():
            writer.write(chunk)
            await writer.drain()
            sent += MiB
    except (ConnectionError, OSError):
        pass  # the server closed the connection: the upload is over
    status, response_headers, body = await answer
    writer.close()
    return status, response_headers, body, sent


async def test_unauthenticated_upload_is_refused_before_its_body_is_read(engine: FakeEngine) -> None:
    """An endless chunked upload without the key gets 401 while it is still sending.

    The server then reads no more of it than a body it would accept
    (MAX_REQUEST_BYTES) before it closes the connection.
    """
    async with running_wrapper(engine.url, API_KEY=KEY, MAX_REQUEST_BYTES=str(2 * MiB)) as wrapper:
        for path in ("/generate", "/v1/chat/completions", "/conversations", "/v1/no-such-route"):
            status, _, body, sent = await upload_until_refused(wrapper, path, "", total_bytes=4096 * MiB)
            assert status == 401, body
            assert json.loads(body)["error"]["code"] == "missing_api_key"
            assert sent < 64 * MiB, f"{path}: the server kept reading the upload ({sent} bytes)"
    assert engine.received == []


async def test_oversized_upload_is_refused_as_it_grows(engine: FakeEngine) -> None:
    """With the key, a chunked body over MAX_REQUEST_BYTES gets 413 at that size, not after the whole upload."""
    async with running_wrapper(engine.url, API_KEY=KEY, MAX_REQUEST_BYTES=str(2 * MiB)) as wrapper:
        for path in ("/generate", "/v1/chat/completions"):
            status, _, body, sent = await upload_until_refused(
                wrapper, path, f"Authorization: Bearer {KEY}\r\n", total_bytes=4096 * MiB
            )
            assert status == 413, body
            assert "MAX_REQUEST_BYTES" in json.loads(body)["error"]["message"]
            assert sent < 64 * MiB, f"{path}: the server kept reading the upload ({sent} bytes)"
        async with wrapper.client(headers=bearer()) as client:
            declared = await client.post("/generate", content=b"x" * (2 * MiB + 1))
            assert declared.status_code == 413
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200, "still serving"
    assert [r.path for r in engine.received] == ["/v1/chat/completions"]


async def test_every_route_needs_the_key_but_probes(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, API_KEY=KEY) as wrapper, wrapper.client() as client:
        for method, path in [
            ("POST", "/generate"), ("GET", "/conversations"), ("GET", "/conversations/abc"),
            ("DELETE", "/conversations/abc"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"),
            ("GET", "/info"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/tokenize"),
            ("POST", "/pooling"), ("POST", "/collective_rpc"), ("GET", "/v1/x/y/z"),
        ]:
            response = await client.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
        for probe in ("/ping", "/health", "/health/live", "/health/ready"):
            assert (await client.get(probe)).status_code in (200, 204, 503), probe
        schema = await client.get("/openapi.json", headers=bearer())
        assert schema.status_code == 200 and "/generate" in schema.json()["paths"]
    assert engine.received == []


async def test_unknown_routes_and_methods_never_reach_the_engine(engine: FakeEngine) -> None:
    """Only the route table is relayed: the engine's admin and unknown routes are out of reach."""
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        for path in ("/collective_rpc", "/sleep", "/v1/unknown", "/scale_elastic_ep", "/v1/chat/completions/x"):
            response = await client.post(path, json={})
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
        wrong = await client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert engine.received == []


async def test_random_paths_leave_the_metric_series_unchanged(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, API_KEY=KEY) as wrapper, wrapper.client() as client:

        async def series() -> set[str]:
            text = (await client.get("/metrics", headers=bearer())).text
            return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("vllm_api_")}

        async def random_paths() -> None:
            for _ in range(30):
                word = uuid.uuid4().hex
                await client.get(f"/v1/{word}")
                await client.post(f"/v1/{word}/{word}", json={}, headers=bearer())
                await client.get(f"/{word}", headers=bearer())

        await random_paths()  # the first round may add the `other` series,
        await series()  # and the first scrape those of /metrics
        before = await series()
        await random_paths()
        after = await series()
    assert after == before
    assert not any(re.search(r'route="/v1/[0-9a-f]{32}', name) for name in after)
    assert any('route="other",status="404"' in name for name in after)


async def test_a_client_that_trickles_its_headers_is_cut_off(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, HEADER_READ_TIMEOUT_S="0.5") as wrapper:
        reader, writer = await open_raw(wrapper)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        trickled = 0
        status = None
        async with asyncio.timeout(60):
            while status is None:
                try:
                    status, _, body = await asyncio.wait_for(read_response(reader), timeout=0.2)
                except TimeoutError:
                    writer.write(b"X")  # one byte of a header every 0.2 s
                    trickled += 1
        assert status == 408 and "HEADER_READ_TIMEOUT_S" in json.loads(body)["error"]["message"]
        assert await reader.read() == b"", "the connection is closed"
        writer.close()

        silent_reader, silent = await open_raw(wrapper)
        async with asyncio.timeout(60):
            assert (await silent_reader.read()).startswith(b"HTTP/1.1 408"), "a connection that sends nothing"
        silent.close()

        async with wrapper.client() as client:  # normal clients are unaffected
            assert (await client.get("/health/live")).status_code == 200


async def test_a_kept_alive_connection_keeps_its_header_deadline_and_closes_when_idle(engine: FakeEngine) -> None:
    """After a response, the connection waits for the next request up to uvicorn's keep-alive timeout;
    the next request's headers are bounded again."""
    async with running_wrapper(engine.url, HEADER_READ_TIMEOUT_S="0.5") as wrapper:
        wrapper.server.config.timeout_keep_alive = 1  # read by each new connection
        reader, writer = await open_raw(wrapper)
        for _ in range(2):
            writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # then the third one's headers stop
        status, _, body = await read_response(reader, timeout_s=60)
        assert status == 408 and "HEADER_READ_TIMEOUT_S" in json.loads(body)["error"]["message"]
        writer.close()

        idle_reader, idle = await open_raw(wrapper)
        idle.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(idle_reader))[0] == 200
        async with asyncio.timeout(60):
            assert await idle_reader.read() == b"", "an idle kept-alive connection is closed, without a 408"
        idle.close()


async def test_a_client_that_trickles_its_body_gets_408_and_frees_its_slot(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, BODY_READ_TIMEOUT_S="0.5", MAX_CONCURRENT_REQUESTS="1") as wrapper:
        reader, writer = await open_raw(wrapper)
        body = json.dumps(CHAT).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        answer = asyncio.ensure_future(read_response(reader, timeout_s=60))
        for byte in body:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        status, _, error = await answer
        writer.close()
        assert status == 408 and "BODY_READ_TIMEOUT_S" in json.loads(error)["error"]["message"]
        async with wrapper.client() as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200, "the slot is free"
    assert len(engine.requests_to("/v1/chat/completions")) == 1


async def test_request_ids_and_client_values_in_the_log_line_are_bounded(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        kept = await client.get("/health/live", headers={"X-Request-ID": "trace-42.a:b_c"})
        assert kept.headers["x-request-id"] == "trace-42.a:b_c"
        for bad in (b"a b", b"x" * 129, b'quote"', b"back\\slash", "ümlaut".encode()):
            replaced = await client.get("/health/live", headers={"X-Request-ID": bad})
            assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"]), bad
        long_model = "m" * 10_000
        await client.post("/v1/chat/completions", json={**CHAT, "model": long_model})
        await client.get("/v1/" + "p" * 10_000)
        lines = await wrapper.wait_for_lines(8)
    assert all(len(line["path"]) <= 257 for line in lines)
    assert all(line["model"] is None or len(line["model"]) <= 257 for line in lines)
    assert engine.requests_to("/v1/chat/completions")[0].headers["X-Request-ID"] == lines[-2]["request_id"]


async def test_trailing_slash_is_the_route_and_engine_redirects_stay_internal(engine: FakeEngine) -> None:
    """GET /v1/models/ is served as /v1/models; a redirect the engine sends never names its address."""
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        models = await client.get("/v1/models/")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == SERVED_NAME
        moved = await client.get("/v1/responses/resp_1")
        assert moved.status_code == 307
        assert moved.headers["location"] == "/v1/responses/resp_1?moved=1"
        assert engine.url not in str(moved.headers)


async def test_continuous_usage_stats_without_include_usage_streams_the_content(engine: FakeEngine) -> None:
    """The client gets the stream it asked for: content, and no usage in any chunk."""
    request = {**CHAT, "stream": True, "max_tokens": 8, "stream_options": {"continuous_usage_stats": True}}
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        response = await client.post("/v1/chat/completions", json=request)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        both = await client.post("/v1/chat/completions", json={
            **request, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        both_events = [json.loads(line[6:]) for line in both.text.splitlines() if line.startswith("data: {")]
        lines = await wrapper.wait_for_lines(2)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Echo: hi there"
    assert not any("usage" in chunk for chunk in chunks)
    assert all("usage" in event for event in both_events), "asked for per-chunk usage: got it"
    assert [line["completion_tokens"] for line in lines] == [3, 3]


async def test_multipart_audio_is_relayed_with_the_size_limit(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, MAX_REQUEST_BYTES=str(MiB)) as wrapper, wrapper.client() as client:
        files = {"file": ("speech.wav", b"RIFF" + bytes(1000), "audio/wav")}
        response = await client.post("/v1/audio/transcriptions", files=files, data={"model": SERVED_NAME})
        assert response.status_code == 200, response.text
        too_big = await client.post("/v1/audio/transcriptions", files={"file": ("a.wav", bytes(2 * MiB), "audio/wav")})
        assert too_big.status_code == 413
        not_multipart = await client.post("/v1/audio/transcriptions", json={"file": "x"})
        assert not_multipart.status_code == 400 and "multipart/form-data" in not_multipart.json()["error"]["message"]
    [received] = engine.requests_to("/v1/audio/transcriptions")
    assert received.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'filename="speech.wav"' in received.body and b"RIFF" in received.body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
async def test_drain_deadline_ends_open_streams_with_an_error_event(engine: FakeEngine, path: str) -> None:
    """At DRAIN_TIMEOUT_S a stream still open gets 503 `drain_timeout` as its last event, then [DONE]."""
    engine.stall_after_first = True
    body = {**CHAT, "stream": True} if path.startswith("/v1") else {"prompt": "hi there", "stream": True}
    async with running_wrapper(engine.url, DRAIN_TIMEOUT_S="0.5") as wrapper, wrapper.client() as client:
        async with client.stream("POST", path, json=body) as response:
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break  # the first piece arrived: the stream is open
            wrapper.server.handle_exit(15, None)
            rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "drain_timeout" and "DRAIN_TIMEOUT_S" in error["message"]


async def test_drain_refuses_new_requests_and_ends_waiting_ones(engine: FakeEngine) -> None:
    engine.first_token_delay_s = 3600  # a non-streamed request whose answer never comes
    async with running_wrapper(engine.url, DRAIN_TIMEOUT_S="0.5", MAX_CONCURRENT_REQUESTS="1") as wrapper:
        async with wrapper.client() as client:
            running = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
            queued = asyncio.ensure_future(client.post("/generate", json={"prompt": "wait"}))
            async with asyncio.timeout(30):
                while not engine.requests_to("/v1/chat/completions"):
                    await asyncio.sleep(0.01)
            wrapper.server.handle_exit(15, None)
            late = await client.post("/v1/chat/completions", json=CHAT)
            first, second = await running, await queued
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert first.status_code == 503 and first.json()["error"]["code"] == "drain_timeout"
    assert second.status_code == 503 and second.json()["error"]["code"] == "draining"


async def test_engine_errors_reach_every_route_in_one_shape(engine: FakeEngine) -> None:
    """The relay and /generate map the same failures to the same status and code."""
    async with running_wrapper(engine.url, REQUEST_TIMEOUT_S="0.5") as wrapper, wrapper.client() as client:
        detail = await client.post("/v1/chat/completions", json={**CHAT, "messages": [
            {"role": "user", "content": "DETAIL"}]})
        assert detail.status_code == 400
        assert detail.json()["error"]["message"] == "body.messages: bad value"

        engine.first_token_delay_s = 3600
        slow_v1 = await client.post("/v1/chat/completions", json=CHAT)
        slow_generate = await client.post("/generate", json={"prompt": "slow"})
        for slow in (slow_v1, slow_generate):
            assert slow.status_code == 504, slow.text
            assert slow.json()["error"]["code"] == "timeout"
            assert "REQUEST_TIMEOUT_S" in slow.json()["error"]["message"]

        engine.first_token_delay_s = 0
        engine.cut_mid_stream = True
        for path, body in (("/v1/chat/completions", {**CHAT, "stream": True}), ("/generate", {"prompt": "a b c",
                                                                                          "stream": True})):
            cut = await client.post(path, json=body)
            events = [line[6:] for line in cut.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", path
            assert json.loads(events[-2])["error"]["code"] == "engine_error", path

        await engine.stop()
        for path, body in (("/v1/chat/completions", CHAT), ("/generate", {"prompt": "anyone?"})):
            gone = await client.post(path, json=body)
            assert gone.status_code == 503 and gone.json()["error"]["code"] == "engine_unavailable", path
            assert "Retry-After" in gone.headers


async def test_stream_idle_timeout_ends_the_stream_with_an_error_event(engine: FakeEngine) -> None:
    engine.stall_after_first = True
    async with running_wrapper(engine.url, STREAM_IDLE_TIMEOUT_S="0.5") as wrapper, wrapper.client() as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "timeout" and "STREAM_IDLE_TIMEOUT_S" in error["message"]


async def test_a_client_leaving_a_relayed_stream_aborts_the_engine_request(engine: FakeEngine) -> None:
    """The relay closes its engine connection when the client leaves, so the engine stops generating (499)."""
    engine.reply = " ".join(f"w{i}" for i in range(200))
    engine.piece_delay_s = 0.02
    async with running_wrapper(engine.url) as wrapper:
        async with wrapper.client() as client, client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True}
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # the first piece arrived; leave
        async with asyncio.timeout(30):
            while engine.aborted != 1:
                await asyncio.sleep(0.01)
        [line] = await wrapper.wait_for_lines(1)
    assert (line["path"], line["status"], line["error"]) == ("/v1/chat/completions", 499, "client_disconnected")


async def test_pipelined_requests_are_answered_in_order(engine: FakeEngine) -> None:
    """Two requests in one write on one connection: each is relayed and answered, in order."""
    body = json.dumps(CHAT).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    async with running_wrapper(engine.url) as wrapper:
        reader, writer = await open_raw(wrapper)
        writer.write(request + request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nX-Request-ID: second\r\n"))
        first, second = await read_response(reader), await read_response(reader)
        writer.close()
    assert first[0] == second[0] == 200
    assert first[1]["x-request-id"] != "second" and second[1]["x-request-id"] == "second"
    assert len(engine.requests_to("/v1/chat/completions")) == 2


async def test_keep_alive_connections_to_the_engine_are_reused(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        for body in (CHAT, {**CHAT, "stream": True}, CHAT):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert len(engine.requests_to("/v1/chat/completions")) == 3
    assert len({received.peer for received in engine.requests_to("/v1/chat/completions")}) == 1


async def test_server_stays_healthy_after_refusals(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, API_KEY=KEY, MAX_REQUEST_BYTES="2048") as wrapper:
        async with wrapper.client() as client:
            for _ in range(3):
                await client.post("/generate", content=b"x" * 5000, headers=bearer())
                await client.post("/v1/chat/completions", content=b"{", headers=bearer())
                await client.post("/v1/chat/completions", json=CHAT)
            ok = await client.post("/v1/chat/completions", json=CHAT, headers=bearer())
            assert ok.status_code == 200
            assert (await client.get("/health")).status_code == 200
        async with httpx.AsyncClient(base_url=wrapper.url) as fresh:
            assert (await fresh.get("/health/live")).status_code == 200


async def test_health_check_path_serves_the_ping_answers(engine: FakeEngine) -> None:
    async with running_wrapper(engine.url, HEALTH_CHECK_PATH="/healthz", API_KEY=KEY) as wrapper:
        async with wrapper.client() as client:
            ping, healthz = await client.get("/ping"), await client.get("/healthz")
            assert healthz.status_code == ping.status_code == 200, "open like /ping, ready: the engine answers"
            assert healthz.json() == ping.json()
        await engine.stop()
        async with wrapper.client() as client, asyncio.timeout(30):
            while (down := await client.get("/healthz")).status_code == 200:
                await asyncio.sleep(0.05)  # the engine check is cached for half a second
        assert down.status_code == 503 and down.json()["status"] == "engine_unavailable"


async def test_a_connection_the_engine_closed_is_retried_once_on_a_new_one(engine: FakeEngine) -> None:
    """The engine drops idle keep-alive connections (and one after a 500); the pool may still hand one out."""
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        engine.drop_requests = 1
        retried = await client.post("/v1/chat/completions", json=CHAT)
        assert retried.status_code == 200, retried.text
        assert (await client.get("/health")).status_code == 200, "not taken for a crashed engine"
        engine.drop_requests = 2
        failed = await client.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "engine_error"
    assert len(engine.requests_to("/v1/chat/completions")) == 4


async def test_other_streams_reach_the_client_whole_and_are_counted(engine: FakeEngine) -> None:
    """Only the usage block the wrapper asked for on chat and completions is taken out of a stream."""
    body = {"model": SERVED_NAME, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
        response = await client.post("/v1/messages", json=body)
        [line] = await wrapper.wait_for_lines(1)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [event["type"] for event in events] == ["message_start", "content_block_delta", "message_delta",
                                                   "message_stop"]
    assert events[2]["usage"] == {"output_tokens": 2}
    assert (line["prompt_tokens"], line["completion_tokens"], line["stream"]) == (7, 2, True)
