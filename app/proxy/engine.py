"""The one HTTP client to the engine, with one mapping of failures to errors.

Both the `/v1` relay and `/generate` reach the engine through `EngineClient.call`,
so a timeout, an unreachable or crashed engine, a failed start or the drain
deadline reads the same on every route: the same status, `code` and sentence.

- Timeouts: `REQUEST_TIMEOUT_S` bounds a whole exchange; streams also get
  `STREAM_IDLE_TIMEOUT_S` between chunks.
- An engine that cannot be reached is explained from the lifecycle: still
  loading (503 `not_ready`), failed to start (503 `startup_failed` with the
  start-up sentence), draining, a remote engine that is away (503), or a local
  engine that died (502 `engine_unavailable`).
- At the drain deadline `abort_all` ends every open exchange, and the caller
  answers 503 `drain_timeout` (an error event when a stream already began).
  New calls are refused the same way.

Exchanges go over `app.proxy.upstream`, a small keep-alive HTTP/1.1 client
for this one trusted address: aiohttp's client cost about 40% of the relay's
CPU (see the README's Performance section). It keeps no cookies: a cookie the
engine sets belongs to the client that got it. The cold paths (readiness
probes, /metrics, /info) use an aiohttp session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp

from app.config import Settings
from app.errors import APIError, unavailable
from app.lifecycle.status import Phase
from app.proxy.upstream import (
    ConnectFailed,
    ConnectionClosed,
    ExchangeTimeout,
    Headers,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from app.readiness import Readiness

FACTS_TIMEOUT_S = 2.0


class EngineClient:
    def __init__(self, settings: Settings, readiness: Readiness) -> None:
        self.url = settings.engine_url
        self._settings = settings
        self._readiness = readiness
        self._remote = settings.ENGINE_URL is not None
        self._total_s = settings.REQUEST_TIMEOUT_S
        self._idle_s = settings.STREAM_IDLE_TIMEOUT_S
        self._pool = UpstreamPool(self.url)
        self._model_pools: dict[str, UpstreamPool] = {}  # with MODELS: one per model's engine
        self._session: aiohttp.ClientSession | None = None
        # Tasks inside `call`, and those that abort_all cancelled.
        self._calls: set[asyncio.Task[Any]] = set()
        self._drained: set[asyncio.Task[Any]] = set()
        self._aborted = False
        self._facts: dict[str, dict[str, Any]] = {}  # by engine URL

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self._readiness.bind(self._session)

    async def close(self) -> None:
        self._pool.close()
        for pool in self._model_pools.values():
            pool.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "EngineClient.start() was not called"
        return self._session

    def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | Headers | None = None,
        stream: bool = False,
        base_url: str | None = None,
    ) -> Exchange:
        """One exchange with the engine, as `async with client.call(...) as response:`.

        Every failure inside, reading included, becomes an `APIError`. `path`
        is already encoded, query string included. With `stream`, the engine
        may also be silent for at most STREAM_IDLE_TIMEOUT_S at a time.
        `base_url` is the engine's when it is not the settings' one (a
        model's engine, with MODELS).
        """
        if isinstance(headers, Mapping):
            headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        return Exchange(self, self._pool_for(base_url), method, path, body, headers or (), stream)

    def _pool_for(self, base_url: str | None) -> UpstreamPool:
        if base_url is None or base_url == self.url:
            return self._pool
        pool = self._model_pools.get(base_url)
        if pool is None:
            pool = self._model_pools[base_url] = UpstreamPool(base_url)
        return pool

    async def _failure(self, error: BaseException, task: asyncio.Task[Any]) -> BaseException:
        """The error to raise for `error` during an exchange (`error` itself when it is not the engine's)."""
        if isinstance(error, asyncio.CancelledError):
            if task not in self._drained:
                return error  # the client left: the caller handles it
            task.uncancel()
            return self._drain_error()
        if isinstance(error, ExchangeTimeout):
            return self._timeout_error(error.idle)
        if isinstance(error, ConnectFailed):
            self._readiness.mark_engine_failed()
            return await self.unreachable_error()
        if isinstance(error, (UpstreamError, OSError)):
            self._readiness.mark_engine_failed()
            return APIError(
                502, "The engine closed the connection before the response was complete; it may have crashed.",
                code="engine_error", cause="engine_error",
            )
        return error

    def abort_all(self) -> int:
        """The drain deadline: end every open exchange and refuse new ones; returns how many were open.

        Each exchange's task is cancelled where it waits (for the engine's
        headers, its next chunk, or the client's socket); `call` turns that
        into the drain error, so the caller answers it like any other failure.
        """
        self._aborted = True
        for task in self._calls:
            self._drained.add(task)
            task.cancel()
        return len(self._calls)

    async def facts(self, base_url: str | None = None) -> dict[str, Any]:
        """max_model_len and version as the engine (at `base_url`, with MODELS) reports them; cached once known."""
        url = base_url or self.url
        if url in self._facts:
            return self._facts[url]
        facts: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=FACTS_TIMEOUT_S)
        try:
            async with self.session.get(f"{url}/v1/models", timeout=timeout) as response:
                models = (await response.json()).get("data") or [{}]
                facts["max_model_len"] = models[0].get("max_model_len")
            async with self.session.get(f"{url}/version", timeout=timeout) as response:
                facts["version"] = (await response.json()).get("version")
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return facts
        self._facts[url] = facts
        return facts

    async def unreachable_error(self) -> APIError:
        """Why the engine does not answer, as the lifecycle explains it."""
        snapshot = await self._readiness.snapshot()
        status = snapshot.status
        if snapshot.phase == Phase.FAILED.value and status and status.error:
            return unavailable(f"Model failed to start: {status.error}", retry_after_s=30, code="startup_failed")
        if snapshot.initializing:
            return unavailable(f"Model is not ready yet (phase: {snapshot.phase}); retry shortly.", code="not_ready")
        if snapshot.phase == Phase.DRAINING.value:
            return unavailable("Server is shutting down; retry on another replica.", code="draining")
        if self._remote:
            # A remote engine is restarted or redeployed on its own: an outage that clients wait out.
            return unavailable(
                "The engine (ENGINE_URL) is not reachable; retry shortly, /health reports when it is back.",
                code="engine_unavailable",
            )
        return APIError(
            502, "The engine is not reachable; it may have crashed.", code="engine_unavailable",
            cause="engine_error", headers={"Retry-After": "5"},
        )

    def _timeout_error(self, idle: bool) -> APIError:
        if idle:
            limit = f"STREAM_IDLE_TIMEOUT_S={self._settings.STREAM_IDLE_TIMEOUT_S:g}"
            what = "sent nothing for too long"
        else:
            limit = f"REQUEST_TIMEOUT_S={self._settings.REQUEST_TIMEOUT_S:g}"
            what = "did not finish in time"
        return APIError(
            504, f"The engine {what} ({limit}); the request was aborted. Try a smaller max_tokens or retry later.",
            code="timeout", cause="timeout",
        )

    def _drain_error(self) -> APIError:
        return unavailable(
            f"Server shut down before the request finished (DRAIN_TIMEOUT_S={self._settings.DRAIN_TIMEOUT_S:g}); "
            "retry on another replica.",
            code="drain_timeout",
        )


class Exchange:
    """`EngineClient.call`'s context: the response inside, its connection released and failures mapped on exit.

    A class rather than a generator-based context manager: it is entered on
    every relayed request.
    """

    __slots__ = ("_body", "_client", "_headers", "_method", "_path", "_pool", "_response", "_stream", "_task")

    def __init__(self, client: EngineClient, pool: UpstreamPool, method: str, path: str, body: bytes | None,
                 headers: Headers, stream: bool) -> None:
        self._client = client
        self._pool = pool
        self._method = method
        self._path = path
        self._body = body
        self._headers = headers
        self._stream = stream
        self._response: UpstreamResponse | None = None
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> UpstreamResponse:
        client = self._client
        if client._aborted:
            raise client._drain_error()
        task = self._task = asyncio.current_task()
        assert task is not None
        client._calls.add(task)
        try:
            self._response = await self._send()
        except BaseException as error:
            client._calls.discard(task)
            mapped = await client._failure(error, task)
            if mapped is error:
                raise
            raise mapped from None
        return self._response

    async def _send(self) -> UpstreamResponse:
        """Send the request; once more on a new connection when the engine closed the first before answering.

        The engine closes idle keep-alive connections after a few seconds, and
        one it closed can still be taken from the pool before the close is
        seen: the request then fails before it reached the engine. A second
        failure is the engine's.
        """
        client = self._client
        idle_s = client._idle_s if self._stream else None
        try:
            return await self._pool.send(
                self._method, self._path, self._headers, self._body, total_s=client._total_s, idle_s=idle_s
            )
        except ConnectionClosed:
            return await self._pool.send(
                self._method, self._path, self._headers, self._body, total_s=client._total_s, idle_s=idle_s,
                fresh=True,
            )

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> bool:
        client = self._client
        assert self._response is not None and self._task is not None
        self._pool.release(self._response)
        client._calls.discard(self._task)
        if error is None:
            return False
        mapped = await client._failure(error, self._task)
        if mapped is error:
            return False
        raise mapped from None
