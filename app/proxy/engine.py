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

aiohttp is the client because it was measured to relay chunks several times
faster than httpx under concurrency (see bench/README.md). The session keeps
no cookies: a cookie the engine sets belongs to the client that got it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from yarl import URL

from app.config import Settings
from app.errors import APIError, unavailable
from app.lifecycle.status import Phase
from app.readiness import Readiness

FACTS_TIMEOUT_S = 2.0


class EngineClient:
    def __init__(self, settings: Settings, readiness: Readiness) -> None:
        self.url = settings.engine_url
        self._settings = settings
        self._readiness = readiness
        self._remote = settings.ENGINE_URL is not None
        self._request_timeout = aiohttp.ClientTimeout(total=settings.REQUEST_TIMEOUT_S)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=settings.REQUEST_TIMEOUT_S, sock_read=settings.STREAM_IDLE_TIMEOUT_S
        )
        self._session: aiohttp.ClientSession | None = None
        # Tasks inside `call`, and those that abort_all cancelled.
        self._calls: set[asyncio.Task[Any]] = set()
        self._drained: set[asyncio.Task[Any]] = set()
        self._aborted = False
        self._facts: dict[str, Any] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self._readiness.bind(self._session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "EngineClient.start() was not called"
        return self._session

    @asynccontextmanager
    async def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
        stream: bool = False,
        base_url: str | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One exchange with the engine; every failure inside, reading included, becomes an `APIError`.

        `path` is already encoded, query string included; `base_url` is the engine's when
        it is not the one of the settings (a model's engine, with MODELS).
        """
        if self._aborted:
            raise self._drain_error()
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            response = await self._send(method, (base_url or self.url) + path, body, headers, stream)
            try:
                yield response
            finally:
                if response.status >= 500:
                    response.close()  # the engine may drop a connection after a failure: never reuse it
                else:
                    response.release()
        except asyncio.CancelledError:
            if task not in self._drained:
                raise  # the client left: the caller handles it
            task.uncancel()
            raise self._drain_error() from None
        except asyncio.TimeoutError as error:
            raise self._timeout_error(error, stream) from None
        except aiohttp.ClientConnectorError:
            self._readiness.mark_engine_failed()
            raise await self.unreachable_error() from None
        except (aiohttp.ClientError, OSError):
            self._readiness.mark_engine_failed()
            raise APIError(
                502, "The engine closed the connection before the response was complete; it may have crashed.",
                code="engine_error", cause="engine_error",
            ) from None
        finally:
            self._calls.discard(task)

    async def _send(
        self, method: str, url: str, body: bytes | None, headers: Any, stream: bool
    ) -> aiohttp.ClientResponse:
        """Send the request; once more on a new connection when a pooled one turns out closed.

        The engine closes idle keep-alive connections after a few seconds, and
        one it closed can still be handed out by the pool: the request then
        fails before it reached the engine. A second failure is the engine's.
        """
        for attempt in (1, 2):
            try:
                return await self.session.request(
                    method,
                    URL(url, encoded=True),
                    data=body,
                    headers=headers,
                    timeout=self._stream_timeout if stream else self._request_timeout,
                    allow_redirects=False,
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
                if attempt == 2 or isinstance(error, aiohttp.ClientConnectorError):
                    raise
        raise AssertionError("unreachable")

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

    async def facts(self) -> dict[str, Any]:
        """max_model_len and version as the engine reports them; cached once known."""
        if self._facts:
            return self._facts
        facts: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=FACTS_TIMEOUT_S)
        try:
            async with self.session.get(f"{self.url}/v1/models", timeout=timeout) as response:
                models = (await response.json()).get("data") or [{}]
                facts["max_model_len"] = models[0].get("max_model_len")
            async with self.session.get(f"{self.url}/version", timeout=timeout) as response:
                facts["version"] = (await response.json()).get("version")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return facts
        self._facts = facts
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

    def _timeout_error(self, error: BaseException, stream: bool) -> APIError:
        if stream and isinstance(error, aiohttp.ServerTimeoutError):
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
