"""The wrapper served in-process, exactly as `app/serve.py` builds it, for tests that take seconds.

`running_wrapper(engine_url, **env)` starts `build_server()` (the front door,
the relay, `/generate`, the header deadline protocol, the drain) on an
ephemeral 127.0.0.1 port in the test's own event loop, in wrapper-only mode
(`ENGINE_URL`), so the engine behind it can be `tests.fake_engine` or any
other stand-in. The access log lines it writes are collected, so a test reads
what an operator would.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings, load_settings
from app.observability.request_log import ACCESS_LOGGER
from app.serve import DrainingServer, bind, build_server


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(dict(record.__dict__))


@dataclass
class Wrapper:
    url: str
    port: int
    server: DrainingServer
    _access: _Collect = field(repr=False)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def request_lines(self) -> list[dict[str, Any]]:
        """The fields of every access log line so far (probes included)."""
        return list(self._access.lines)

    async def wait_for_lines(self, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        """Wait until `count` request lines were written (a request's line comes after its response)."""
        async with asyncio.timeout(timeout_s):
            while len(self._access.lines) < count:
                await asyncio.sleep(0.01)
        return self.request_lines()


@asynccontextmanager
async def running_wrapper(engine_url: str, **env: str) -> AsyncIterator[Wrapper]:
    """The wrapper in front of `engine_url`; conversations go to a temporary directory unless HF_HOME is given."""
    with tempfile.TemporaryDirectory(prefix="wrapper-") as cache:
        # One process here: WORKERS=auto would split the limits as if the machine's cores ran more.
        settings = load_settings({"ENGINE_URL": engine_url, "SERVED_MODEL_NAME": "fake-model", "HF_HOME": cache,
                                  "WORKERS": "1", **env})
        async with _serving(settings) as wrapper:
            yield wrapper


@asynccontextmanager
async def running_models_wrapper(control_socket: str, status_file: Path, **env: str) -> AsyncIterator[Wrapper]:
    """The wrapper of a multi-model deployment (MODELS in `env`), asking `control_socket` for the engines."""
    with tempfile.TemporaryDirectory(prefix="wrapper-") as cache:
        settings = load_settings({"HF_HOME": cache, **env})
        async with _serving(settings, status_file, control_socket) as wrapper:
            yield wrapper


@asynccontextmanager
async def _serving(
    settings: Settings, status_file: Path | None = None, control_socket: str | None = None
) -> AsyncIterator[Wrapper]:
    server = build_server(settings, status_file, log_config=False, control_socket=control_socket)
    sock = bind("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    access = _Collect()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(access)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the wrapper did not start")
            await asyncio.sleep(0.01)
        yield Wrapper(f"http://127.0.0.1:{port}", port, server, access)
    finally:
        server.should_exit = True
        await serving
        sock.close()
        logger.removeHandler(access)
        logger.setLevel(previous_level)
