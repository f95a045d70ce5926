"""Run one wrapper process: uvicorn serving `app.main:app`, with a graceful drain.

uvicorn's own shutdown stops accepting connections at once, which would turn
load balancer probes and late requests into connection errors. Here the first
SIGTERM or SIGINT starts a drain instead: probes report `draining` (503), new
inference requests get 503 with `Retry-After`, in-flight requests get up to
`DRAIN_TIMEOUT_S` to finish, and whatever is still running at the deadline
ends with an error event rather than a silent cut. Only then does uvicorn
stop. A second signal stops at once.

`PORT_HEALTH`, when it differs from `PORT`, is a second listening socket of
the same app, so `/ping` answers there too.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from app.config import ConfigError, Settings, load_settings
from app.observability.logging import configure_logging, install_secret_redaction, uvicorn_log_config
from app.proxy.gateway import Gateway

log = logging.getLogger("app.serve")
DRAIN_POLL_S = 0.05
ABORT_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_timeout_s = drain_timeout_s
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
        self.gateway.readiness.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signal_name: str) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.drain(signal_name))

    async def drain(self, reason: str) -> None:
        gateway = self.gateway
        gateway.readiness.draining = True
        in_flight = gateway.admission.in_flight + gateway.admission.queued
        log.info("draining", extra={"signal": reason, "in_flight": in_flight, "drain_timeout_s": self.drain_timeout_s})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while (gateway.admission.in_flight or gateway.admission.queued) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        unfinished = list(gateway.active)
        if unfinished:
            log.warning("drain deadline reached", extra={"unfinished_requests": len(unfinished)})
            gateway.aborting = True
            for task in unfinished:
                task.cancel()
            await asyncio.wait(unfinished, timeout=ABORT_GRACE_S)
        self.should_exit = True


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"vllm-inference-api: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)
    install_secret_redaction(settings.secret_values)
    from app.main import app  # imported after logging is configured

    # Everything loaded so far lives as long as the process, and a request leaves
    # no reference cycles (tests/unit/test_proxy_in_process.py): keep the long-lived
    # objects out of the collector's scans.
    gc.freeze()

    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=uvicorn_log_config(settings.LOG_FORMAT, settings.LOG_LEVEL),
        timeout_keep_alive=30,
        server_header=False,
    )
    server = DrainingServer(config, app.state.gateway, settings.DRAIN_TIMEOUT_S)
    server.run(sockets=listening_sockets(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
