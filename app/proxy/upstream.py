"""A small HTTP/1.1 client for the one upstream the wrapper relays to: the engine.

Profiled under load, aiohttp's client took about 40% of the wrapper's CPU on
the relay path: per request it builds a request object, a response object
with a multidict of headers and a StreamReader, runs tracing and cookie hooks,
and handles redirects, proxies and compression the relay never uses. The
engine is one fixed, trusted host reached over keep-alive connections, so this
client does only what that takes:

- a pool of idle keep-alive connections to one address, most recent first;
  one that the engine closed, or that sat idle longer than `IDLE_KEEPALIVE_S`
  (below uvicorn's 5 s, which vLLM serves with), is not reused;
- the request written in one `write`; the response parsed by httptools (the C
  parser uvicorn uses), content-length, chunked or close-delimited;
- flow control: reading from the engine pauses while a response holds more
  than `HIGH_WATER_BYTES` its reader has not taken;
- timeouts: one for the whole exchange and, for streams, one for the silence
  between reads, checked by one timer per connection (`app.lazy_timer`)
  rather than one per read or per exchange;
- an exchange left before its end closes its connection, so the engine sees
  the disconnect and aborts the generation.

Failures are exceptions of this module (`UpstreamError`); `EngineClient.call`
turns them into the wrapper's errors.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import httptools

from app.lazy_timer import LazyTimer

HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024
MAX_LINE_BYTES = 256 * 1024
IDLE_KEEPALIVE_S = 4.0
Headers = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The exchange failed below HTTP: no connection, a broken one, or a timeout."""


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, unreachable, name not resolved)."""


class ConnectionBroken(UpstreamError):
    """The engine closed or reset the connection, or sent what is not HTTP, before the response was complete."""


class ConnectionClosed(ConnectionBroken):
    """The engine closed or reset the connection before the response was complete."""


class ExchangeTimeout(UpstreamError):
    def __init__(self, idle: bool) -> None:
        super().__init__("no data for too long" if idle else "the exchange took too long")
        self.idle = idle  # True: the silence between reads; False: the whole exchange


class UpstreamResponse:
    """The engine's answer: status and headers at once, the body as it arrives.

    The reading methods mirror aiohttp's StreamReader (`read`, `readany`,
    `read_nowait`, `readline`, `at_eof`); `content` is the response itself.
    """

    __slots__ = (
        "_chunks", "_close_delimited", "_connection", "_deadline", "_eof", "_error", "_head_only",
        "_idle_s", "_loop", "_paused", "_reusable", "_size", "_waiter", "headers", "last_data_at", "status",
    )

    def __init__(self, connection: _Connection, loop: asyncio.AbstractEventLoop, head_only: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # as the engine sent them
        self.last_data_at = 0.0
        self._connection = connection
        self._loop = loop
        self._head_only = head_only
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._close_delimited = False
        self._reusable = False
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._idle_s: float | None = None

    # --- what the caller reads ----------------------------------------------
    @property
    def content(self) -> UpstreamResponse:
        return self

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case (aiohttp's default when absent)."""
        for name, value in self.headers:
            if name.lower() == b"content-type":
                return value.partition(b";")[0].strip().lower().decode("latin-1")
        return "application/octet-stream"

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def read_nowait(self) -> bytes:
        """What has arrived and was not read yet (b"" when nothing has)."""
        if self._error is not None:
            raise self._error
        return self._take() if self._chunks else b""

    async def readany(self) -> bytes:
        """What has arrived, waiting for something when nothing has; b"" at the end."""
        while not self._chunks:
            if self._eof:
                return b""
            await self._wait()
        return self._take()

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while True:
            if self._chunks:
                parts.append(self._take())
            if self._eof:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    async def readline(self) -> bytes:
        """Up to and including the next b"\\n", or what is left at the end; ValueError past MAX_LINE_BYTES."""
        while True:
            if self._chunks:
                if len(self._chunks) > 1:
                    self._chunks[:] = [b"".join(self._chunks)]
                data = self._chunks[0]
                end = data.find(b"\n")
                if end >= 0:
                    line, rest = data[: end + 1], data[end + 1 :]
                    self._chunks[:] = [rest] if rest else []
                    self._taken(len(line))
                    return line
                if len(data) > MAX_LINE_BYTES:
                    raise ValueError(f"a line longer than {MAX_LINE_BYTES} bytes")
            if self._eof:
                return self._take() if self._chunks else b""
            await self._wait()

    # --- internals ------------------------------------------------------------
    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._taken(len(data))
        return data

    def _taken(self, size: int) -> None:
        self._size -= size
        if self._paused and self._size <= LOW_WATER_BYTES:
            self._paused = False
            self._connection.resume()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._eof:
            self._error = error
            self._connection.close()
            self._wake()

    def _arm(self, total_s: float, idle_s: float | None) -> None:
        now = self._loop.time()
        self._deadline = now + total_s
        self._idle_s = idle_s
        self.last_data_at = now
        self._connection.timer.set(self._next_check(), self._check_time)

    def _next_check(self) -> float:
        if self._idle_s is None:
            return self._deadline
        return min(self._deadline, self.last_data_at + self._idle_s)

    def _check_time(self) -> None:
        """One deadline per exchange (on its connection's timer): at each expiry, a timeout or a later check."""
        if self._eof or self._error is not None:
            return
        now = self._loop.time()
        if now >= self._deadline:
            self._fail(ExchangeTimeout(idle=False))
        elif self._idle_s is not None and now >= self.last_data_at + self._idle_s:
            self._fail(ExchangeTimeout(idle=True))
        else:
            self._connection.timer.set(self._next_check(), self._check_time)

    def _disarm(self) -> None:
        connection = self._connection
        if connection.response is self:  # else the connection has moved on to another exchange
            connection.timer.clear()

    # --- from the connection ---------------------------------------------------
    def _on_headers(self, status: int, close_delimited: bool) -> None:
        self.status = status
        self._close_delimited = close_delimited
        if self._head_only:
            # No body follows a HEAD; httptools would wait for the one content-length announces.
            self._eof = True
            self._disarm()
        self._wake()

    def _on_body(self, data: bytes) -> None:
        if self._head_only:
            return
        self._chunks.append(data)
        self._size += len(data)
        if not self._paused and self._size > HIGH_WATER_BYTES:
            self._paused = True
            self._connection.pause()
        self._wake()

    def _on_complete(self, keep_alive: bool) -> None:
        if self._eof:
            return
        self._eof = True
        self._reusable = keep_alive
        self._disarm()
        self._wake()

    def _on_lost(self) -> None:
        if self._eof or self._error is not None:
            return
        if self.status and self._close_delimited:
            self._on_complete(keep_alive=False)  # the body ends with the connection
        else:
            self._fail(ConnectionClosed("the engine closed the connection before the response was complete"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries at most one exchange at a time."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self.timer = LazyTimer(loop)  # the deadlines of its exchanges, one after the other
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._length_known = False

    # --- asyncio ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes on an idle connection: it cannot be trusted with the next request
            return
        if response._idle_s is not None:
            response.last_data_at = response._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            response._fail(ConnectionBroken("the engine sent a response that is not valid HTTP/1.1"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.timer.cancel()
        if self.response is not None:
            self.response._on_lost()
        else:
            self._pool._forget(self)

    # --- httptools ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []
        self._length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self._length_known = True

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            response.headers = self._headers
            response._on_headers(self._parser.get_status_code(), not self._length_known)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._on_body(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._on_complete(self._parser.should_keep_alive())

    # --- pool -------------------------------------------------------------------
    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.timer.cancel()
            if self.transport is not None:
                self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one base URL (http or https, with an optional path prefix)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http:// or https:// URL")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/").encode("latin-1")
        self._host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(
        self, method: str, target: str, headers: Headers, body: bytes | None, *, total_s: float,
        idle_s: float | None = None, fresh: bool = False,
    ) -> UpstreamResponse:
        """Send one request and wait for the response's status and headers.

        `target`: the encoded path and query; `fresh`: on a new connection,
        not an idle one. The caller must `release` the response once it has
        it: that returns or closes its connection (a failure here releases it).
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()  # one pool, one loop: asked once (a getpid each time)
        connection = await self._connection(loop, fresh)
        response = UpstreamResponse(connection, loop, head_only=method == "HEAD")
        connection.response = response
        response._arm(total_s, idle_s)
        try:
            assert connection.transport is not None
            connection.transport.write(self._request(method, target, headers, body))
            while not response.status:
                await response._wait()
        except BaseException:
            self.release(response)
            raise
        return response

    def release(self, response: UpstreamResponse) -> None:
        """The exchange is over: keep its connection for the next if it ended cleanly, else close it.

        A connection that carried a 5xx is closed too: an engine may drop it
        right after a failure, and the next request would then be lost on it.
        """
        response._disarm()
        connection = response._connection
        connection.response = None
        if response._reusable and response.status < 500 and response.at_eof() and not connection.closed:
            connection.idle_since = response._loop.time()
            self._idle.append(connection)
        else:
            connection.close()
            self._open.discard(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _forget(self, connection: _Connection) -> None:
        """An idle connection the engine closed (its keep-alive ran out)."""
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    async def _connection(self, loop: asyncio.AbstractEventLoop, fresh: bool) -> _Connection:
        idle = self._idle
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed and loop.time() - connection.idle_since < IDLE_KEEPALIVE_S:
                return connection
            connection.close()
            self._open.discard(connection)
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self, loop), self._host, self._port, ssl=self._ssl
            )
        except OSError as error:
            raise ConnectFailed(str(error)) from None
        self._open.add(connection)
        return connection

    def _request(self, method: str, target: str, headers: Headers, body: bytes | None) -> bytes:
        lines = [b"%s %s%s HTTP/1.1" % (method.encode("ascii"), self._prefix, target.encode("latin-1")),
                 b"host: " + self._host_header]
        lines += [name + b": " + value for name, value in headers]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d" % len(body or b""))
        head = b"\r\n".join(lines)
        # One count for all headers: a CR or LF inside a name or value would start a header of its own.
        if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            raise ValueError("a header name or value has a line break in it")
        return head + b"\r\n\r\n" + body if body else head + b"\r\n\r\n"
