"""The relay's HTTP/1.1 client to the engine (`app.proxy.upstream`), against a scripted raw HTTP server.

The server is a plain asyncio protocol that answers each request with the
exact bytes a test gives it, so every case the client must handle can be
produced on purpose: keep-alive reuse, a connection the engine closes while
idle, chunked and close-delimited bodies, HEAD, a cut, silence, and a reader
that stops reading. Tests wait for events with generous deadlines; none asserts
that something happened within a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from app.proxy import upstream
from app.proxy.upstream import (
    ConnectFailed,
    ConnectionBroken,
    ConnectionClosed,
    ExchangeTimeout,
    UpstreamPool,
    UpstreamResponse,
)
from tests.unit.test_bench_loadgen import free_port

WAIT_S = 30.0
TRICKLES, TRICKLE_GAP_S, IDLE_LIMIT_S = 8, 0.5, 2.5
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

Answer = Callable[["Connection", bytes], None]


@dataclass
class Script:
    """What the server does with each complete request head (and its body, when content-length says)."""

    answer: Answer
    connections: list[Connection] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Connection(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.script.connections.append(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            request, self.buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
            self.script.requests.append(request)
            self.script.answer(self, request)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.script.closed.set()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], asyncio.Future[tuple[Script, UpstreamPool]]]]:
    servers: list[asyncio.Server] = []
    pools: list[UpstreamPool] = []

    async def start(answer: Answer) -> tuple[Script, UpstreamPool]:
        script = Script(answer)
        port = free_port()
        servers.append(await asyncio.get_running_loop().create_server(lambda: Connection(script), "127.0.0.1", port))
        pools.append(UpstreamPool(f"http://127.0.0.1:{port}"))
        return script, pools[-1]

    yield start  # type: ignore[misc]
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()


async def exchange(pool: UpstreamPool, method: str = "POST", body: bytes | None = b"{}", **timeouts: float) -> bytes:
    response = await pool.send(method, "/v1/chat/completions", [(b"content-type", b"application/json")], body,
                               total_s=timeouts.get("total_s", WAIT_S), idle_s=timeouts.get("idle_s"))
    try:
        return await response.read()
    finally:
        pool.release(response)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


async def test_requests_reuse_one_keep_alive_connection(serve) -> None:
    script, pool = await serve(lambda conn, _: conn.write(OK))

    bodies = [await exchange(pool) for _ in range(3)]

    assert bodies == [b"{}"] * 3
    assert len(script.connections) == 1 and len(script.requests) == 3
    head = script.requests[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{script.connections[0].transport.get_extra_info('sockname')[1]}" in head
    assert "content-length: 2" in head and head.endswith("\r\n\r\n{}")


async def test_a_connection_the_engine_closed_while_idle_is_not_reused(serve) -> None:
    def answer_then_close(conn: Connection, _: bytes) -> None:
        conn.write(OK)
        conn.transport.close()  # like uvicorn when its keep-alive runs out

    script, pool = await serve(answer_then_close)
    await exchange(pool)
    await script.closed.wait()
    await until(lambda: not pool._idle)  # the client saw the close

    assert await exchange(pool) == b"{}"
    assert len(script.connections) == 2


async def test_a_connection_idle_past_the_keep_alive_is_not_reused(serve, monkeypatch) -> None:
    script, pool = await serve(lambda conn, _: conn.write(OK))
    await exchange(pool)
    monkeypatch.setattr(upstream, "IDLE_KEEPALIVE_S", 0.0)

    await exchange(pool)

    assert len(script.connections) == 2


async def test_chunked_and_close_delimited_bodies_are_read_whole(serve) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    def close_delimited(conn: Connection, _: bytes) -> None:
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        conn.transport.close()

    _, chunked_pool = await serve(lambda conn, _: conn.write(chunked))
    script, pool = await serve(close_delimited)

    assert await exchange(chunked_pool) == b"hello world"
    assert await exchange(pool) == b"until the end"
    assert await exchange(pool) == b"until the end"  # on a new connection
    assert len(script.connections) == 2


async def test_a_response_in_pieces_as_small_as_one_byte_is_read_whole(serve) -> None:
    """TCP may cut anywhere: inside the status line, a header, a chunk size or a chunk's data."""
    events = [b"data: one\n\n", b"data: two\n\n"]
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" \
             + b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"

    async def byte_by_byte(conn: Connection) -> None:
        for i in range(len(answer)):
            conn.write(answer[i : i + 1])
            await asyncio.sleep(0)

    tasks = []
    script, pool = await serve(lambda conn, _: tasks.append(asyncio.ensure_future(byte_by_byte(conn))))

    assert await exchange(pool) == b"".join(events)
    assert await exchange(pool) == b"".join(events)
    assert len(script.connections) == 1, "a response read whole leaves its connection reusable"


async def test_a_connection_that_carried_a_server_error_is_not_reused(serve) -> None:
    failed = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}"
    answers = iter([failed, OK])
    script, pool = await serve(lambda conn, _: conn.write(next(answers)))

    await exchange(pool)
    await exchange(pool)

    assert len(script.connections) == 2


async def test_a_request_the_engine_closed_before_answering_is_a_closed_connection(serve) -> None:
    """What `EngineClient` retries once, on a fresh connection rather than another idle one."""
    answers = iter([OK, None, OK, OK])

    def answer(conn: Connection, _: bytes) -> None:
        if (reply := next(answers)) is None:
            conn.transport.close()  # like a stale keep-alive connection the request raced
        else:
            conn.write(reply)

    script, pool = await serve(answer)
    await exchange(pool)
    with pytest.raises(ConnectionClosed):
        await exchange(pool)
    await exchange(pool)
    assert len(script.connections) == 2

    response = await pool.send("POST", "/", [], b"", total_s=WAIT_S, fresh=True)
    pool.release(response)
    assert len(script.connections) == 3, "not the idle one"


async def test_a_head_request_ends_with_its_headers(serve) -> None:
    script, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 120\r\n\r\n"))

    assert await exchange(pool, "HEAD", None) == b""
    assert script.requests[0].startswith(b"HEAD /v1/chat/completions HTTP/1.1\r\n")
    assert b"content-length" not in script.requests[0]


async def test_a_cut_mid_body_is_an_error_not_a_short_body(serve) -> None:
    def cut(conn: Connection, _: bytes) -> None:
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        conn.transport.close()

    _, pool = await serve(cut)

    with pytest.raises(ConnectionBroken):
        await exchange(pool)


async def test_what_is_not_http_is_an_error(serve) -> None:
    _, pool = await serve(lambda conn, _: conn.write(b"SSH-2.0-OpenSSH\r\n\r\n"))

    with pytest.raises(ConnectionBroken):
        await exchange(pool)


async def test_no_listener_is_a_connect_failure() -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{free_port()}")

    with pytest.raises(ConnectFailed):
        await exchange(pool)


async def test_silence_ends_the_exchange_and_its_connection(serve) -> None:
    script, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"))

    with pytest.raises(ExchangeTimeout) as idle:
        await exchange(pool, idle_s=0.2)
    with pytest.raises(ExchangeTimeout) as total:
        await exchange(pool, total_s=0.2)

    assert idle.value.idle is True and total.value.idle is False
    assert len(script.connections) == 2  # each timed-out connection was closed, none reused
    await until(lambda: all(conn.transport.is_closing() for conn in script.connections))


async def test_an_idle_timeout_counts_from_the_last_data_not_the_start(serve) -> None:
    async def trickle(conn: Connection) -> None:
        conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(TRICKLES):
            await asyncio.sleep(TRICKLE_GAP_S)
            conn.write(b"1\r\nx\r\n")
        conn.write(b"0\r\n\r\n")

    tasks = []
    _, pool = await serve(lambda conn, _: tasks.append(asyncio.ensure_future(trickle(conn))))

    # The stream lasts longer than the idle limit, with gaps five times shorter than it.
    assert TRICKLES * TRICKLE_GAP_S > IDLE_LIMIT_S
    assert await exchange(pool, idle_s=IDLE_LIMIT_S) == b"x" * TRICKLES


async def test_an_exchange_left_early_closes_its_connection(serve) -> None:
    script, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfive!"))
    response = await pool.send("POST", "/", [], b"", total_s=WAIT_S)
    assert await response.readany() == b"five!"

    pool.release(response)  # like a client that went away mid-stream

    await script.closed.wait()  # the engine sees the disconnect and aborts
    assert not pool._idle


async def test_reading_pauses_while_the_reader_lags_and_resumes_when_it_reads(serve, monkeypatch) -> None:
    monkeypatch.setattr(upstream, "HIGH_WATER_BYTES", 1024)
    monkeypatch.setattr(upstream, "LOW_WATER_BYTES", 0)
    piece = b"x" * 4096
    total = 64 * len(piece)
    _, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                                     % (total, piece * 64)))
    response: UpstreamResponse = await pool.send("POST", "/", [], b"", total_s=WAIT_S)
    try:
        await until(lambda: response._paused)
        held = response._size
        await asyncio.sleep(0.1)
        assert response._size == held  # nothing more is read while paused
        received = len(await response.read())
    finally:
        pool.release(response)

    assert held < total and received == total


async def test_lines_are_read_across_chunks_and_a_huge_one_is_refused(serve) -> None:
    body = b"data: one\n\ndata: t" + b"wo\n\n"
    _, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                                     % (len(body), body)))
    response = await pool.send("POST", "/", [], b"", total_s=WAIT_S)
    try:
        lines = [await response.readline() for _ in range(5)]
    finally:
        pool.release(response)
    assert lines == [b"data: one\n", b"\n", b"data: two\n", b"\n", b""]

    huge = b"x" * (upstream.MAX_LINE_BYTES + 1)
    _, pool = await serve(lambda conn, _: conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                                     % (len(huge), huge)))
    response = await pool.send("POST", "/", [], b"", total_s=WAIT_S)
    try:
        with pytest.raises(ValueError):
            await response.readline()
    finally:
        pool.release(response)


async def test_a_header_value_with_a_line_break_is_never_sent(serve) -> None:
    script, pool = await serve(lambda conn, _: conn.write(OK))

    with pytest.raises(ValueError):
        await pool.send("POST", "/", [(b"x-injected", b"a\r\nhost: elsewhere")], b"", total_s=WAIT_S)

    assert script.requests == []


def test_base_url_with_a_path_prefix_and_https() -> None:
    pool = UpstreamPool("https://engine.internal/prefix/")

    request = pool._request("GET", "/v1/models?x=1", [], None)

    assert request == b"GET /prefix/v1/models?x=1 HTTP/1.1\r\nhost: engine.internal\r\n\r\n"
    assert pool._port == 443 and pool._ssl is not None
    with pytest.raises(ValueError):
        UpstreamPool("ftp://engine")
