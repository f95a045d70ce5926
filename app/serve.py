"""Run one wrapper process: uvicorn serving the wrapper application, with a graceful drain.

uvicorn's own shutdown stops accepting connections at once, which would turn
load balancer probes and late requests into connection errors. Here the first
SIGTERM or SIGINT starts a drain instead: probes report `draining` (503), new
inference requests get 503 with `Retry-After`, in-flight requests get up to
`DRAIN_TIMEOUT_S` to finish, and whatever is still running at the deadline
ends with an error event rather than a silent cut. Only then does uvicorn
stop. A second signal stops at once.

uvicorn runs with a protocol that also bounds the time to receive a
request's headers (`HEADER_READ_TIMEOUT_S`) and what is read of a body the
wrapper refused without reading, that tells the application when a client
hangs up and when a body is complete, and that sends a response's head with
its first body bytes (`GuardedHttpProtocol`).

`PORT_HEALTH`, when it differs from `PORT`, is a second listening socket of
the same app, so `/ping` answers there too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import ConfigError, Settings, load_settings
from app.errors import APIError
from app.lazy_timer import LazyTimer
from app.lifecycle.status import CONTROL_SOCKET_ENV, STATUS_FILE_ENV
from app.main import create_app
from app.observability.logging import configure_logging, install_secret_redaction, uvicorn_log_config
from app.request_progress import EXTENSION, RequestProgress
from app.services import Services

log = logging.getLogger("app.serve")
# After the drain, what uvicorn still waits for before it stops anyway.
SHUTDOWN_GRACE_S = 5.0
# Allocations between two collections of the youngest generation (Python: 700).
GC_YOUNG_THRESHOLD = 10_000
# How much of a refused, unread body the server reads and discards, in MAX_REQUEST_BYTES.
LINGER_BODIES = 4


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Refuse new requests from the next one on, before the drain task first runs.
        self.services.gateway.begin_drain()
        log.info("stop requested", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.services.drain()
        self.should_exit = True


class HeadWithBody:
    """The transport of one response: its head waits for the body's first bytes, to leave in one write.

    uvicorn writes a response's head at `http.response.start` and its body at
    `http.response.body`: two writes, two packets, two wake-ups of the client,
    for a response the relay sends in one go. Here the head waits until the
    next write or the end of the event-loop iteration, whichever comes first,
    so a stream's head is not held back until its first token.
    """

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = b""  # b"": nothing written yet; None: the head has gone

    def write(self, data: bytes) -> None:
        head = self._head
        if head is None:
            self._transport.write(data)
        elif head:
            self._head = None
            self._transport.write(head + data)
        else:
            self._head = data
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._head:
            self._transport.write(self._head)
        self._head = None

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with two bounds uvicorn lacks, and a `RequestProgress` per request.

    - Headers: uvicorn bounds the idle time between requests
      (timeout_keep_alive), not the time a client takes to send a request's
      headers; one that trickles a byte every few seconds would hold its
      connection forever (slowloris). Here the headers must be complete
      HEADER_READ_TIMEOUT_S after the connection opens, or after the first
      byte of a later request on it; otherwise 408 and the connection closes.
    - A body left unread: when the wrapper refuses a request before reading
      its body (401, 413, 429, ...), uvicorn reads and discards the rest so
      the client, still sending, can read the answer (most HTTP clients only
      read it once they have sent everything). Here that lingering is bounded:
      at most LINGER_BODIES times MAX_REQUEST_BYTES more (so a file somewhat
      over the limit still gets its 413 rather than a reset), within
      BODY_READ_TIMEOUT_S; then the connection closes.

    The body the wrapper does read has its deadline in the front door.

    Each request's scope carries a `RequestProgress` (app.request_progress)
    that this protocol keeps current: body complete, client gone. Requests
    being served or waiting (pipelined) have theirs in `_progress`, oldest
    first; a closed connection reaches all of them. Each response is written
    through a `HeadWithBody`.
    """

    header_timeout_s = 10.0
    linger_bytes = 30 * 1024 * 1024
    linger_timeout_s = 60.0
    _lingering = False
    _discarded = 0
    _idle = False  # the deadline set is the keep-alive one (no request since the last response)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._progress: deque[RequestProgress] = deque()
        # Headers, keep-alive and linger deadlines, one at a time, on one timer (app.lazy_timer).
        self._timer = LazyTimer(self.loop)
        self._arm(self.header_timeout_s, self._headers_too_slow)

    def _unset_keepalive_if_required(self) -> None:
        """uvicorn's hook when data arrives: the keep-alive deadline ends (uvicorn's own timer is never set)."""
        if self._idle:
            self._idle = False
            self._timer.clear()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._timer.pending:
            self._arm(self.header_timeout_s, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._timer.clear()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:  # a request to serve, not an upgrade
            self.cycle.transport = HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]
            progress = RequestProgress()
            self.scope["extensions"] = {EXTENSION: progress}
            self._progress.append(progress)

    def on_body(self, body: bytes) -> None:
        if self._lingering:
            self._discarded += len(body)
            if self._discarded > self.linger_bytes:
                self.transport.close()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._lingering:
            self._lingering = False
            self._timer.clear()
            if not self.pipeline and not self.transport.is_closing():
                self._keep_alive()
        super().on_message_complete()
        if self._progress:
            self._progress[-1].body_complete = True  # the request whose headers came last

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timer replaced by a deadline on the connection's one timer."""
        if self._progress:
            self._progress.popleft()  # responses complete in the order requests arrived
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.cycle is not None and self.cycle.more_body:
            self._lingering, self._discarded = True, 0
            self._arm(self.linger_timeout_s, self.transport.close)
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif not self._lingering:
            self._keep_alive()

    def _keep_alive(self) -> None:
        self._arm(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._idle = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        super().connection_lost(exc)
        progress, self._progress = self._progress, deque()
        for request in progress:
            request.client_left()

    def _arm(self, delay_s: float, callback: Callable[[], object]) -> None:
        self._idle = False
        self._timer.set(self.loop.time() + delay_s, callback)

    def _headers_too_slow(self) -> None:
        if self.transport.is_closing():
            return
        body = APIError(
            408, f"The request headers did not arrive within HEADER_READ_TIMEOUT_S={self.header_timeout_s:g}s.",
            code="request_timeout",
        ).json_bytes()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    """The protocol class with this server's limits (uvicorn builds one instance per connection)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_timeout_s": settings.HEADER_READ_TIMEOUT_S,
        "linger_bytes": LINGER_BODIES * settings.MAX_REQUEST_BYTES,
        "linger_timeout_s": settings.BODY_READ_TIMEOUT_S,
    })


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP
    # (uvloop does it anyway); with Nagle on, a response's body waits for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def listening_sockets(settings: Settings) -> list[socket.socket]:
    reuse_port = settings.WORKERS > 1
    sockets = [bind(settings.HOST, settings.PORT, reuse_port)]
    if settings.PORT_HEALTH and settings.PORT_HEALTH != settings.PORT:
        sockets.append(bind(settings.HOST, settings.PORT_HEALTH, reuse_port))
    return sockets


def build_server(
    settings: Settings, status_file: Path | None = None, *, log_config: bool = True, control_socket: str | None = None
) -> DrainingServer:
    """The wrapper's server, as `main` runs it (tests run it in-process with `log_config=False`)."""
    services = Services.build(settings, status_file, control_socket)
    config = uvicorn.Config(
        create_app(services),
        loop="uvloop",
        http=guarded_protocol(settings),
        lifespan="on",
        access_log=False,
        log_config=uvicorn_log_config(settings.LOG_FORMAT, settings.LOG_LEVEL) if log_config else None,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        server_header=False,
    )
    return DrainingServer(config, services)


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"vllm-inference-api: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)
    install_secret_redaction(settings.secret_values)
    status_file = os.environ.get(STATUS_FILE_ENV)
    server = build_server(
        settings, Path(status_file) if status_file else None, control_socket=os.environ.get(CONTROL_SOCKET_ENV)
    )
    # Everything loaded so far lives as long as the process, and a request leaves
    # no reference cycles (tests/unit/test_proxy_in_process.py): keep the long-lived
    # objects out of the collector's scans.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    server.run(sockets=listening_sockets(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
