"""The long-lived objects one wrapper process shares between requests.

One aiohttp connection pool to the engine, the backpressure queue, the key
check, the media policy and the readiness view are created once, when the
process starts, and handed to every request through this object.

aiohttp is the proxy's HTTP client because it was measured to relay chunks
several times faster than httpx under concurrency (see bench/README.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from app.auth import KeyCheck
from app.config import Settings
from app.errors import APIError, unavailable
from app.lifecycle.status import Phase
from app.media import MediaFetcher, MediaPolicy, detect_modalities
from app.proxy.admission import Admission
from app.readiness import Readiness


def per_worker(total: int, workers: int) -> int:
    """A share of a server-wide limit: the kernel spreads connections evenly over
    the workers (SO_REUSEPORT), so each enforces its part; 0 stays "no limit"."""
    return 0 if total == 0 else max(1, -(-total // workers))


@dataclass
class Gateway:
    settings: Settings
    status_file: Path | None
    readiness: Readiness = field(init=False)
    keys: KeyCheck = field(init=False)
    admission: Admission = field(init=False)
    media_fetcher: MediaFetcher = field(init=False)
    session: aiohttp.ClientSession = field(init=False)
    request_timeout: aiohttp.ClientTimeout = field(init=False)
    stream_timeout: aiohttp.ClientTimeout = field(init=False)
    active: set[asyncio.Task[Any]] = field(default_factory=set)
    aborting: bool = False
    _media_policy: MediaPolicy | None = None
    _engine_facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings = self.settings
        self.engine_url = settings.engine_url
        self.readiness = Readiness(self.status_file, self.engine_url)
        self.keys = KeyCheck(settings.api_keys)
        self.admission = Admission(
            per_worker(settings.MAX_CONCURRENT_REQUESTS, settings.WORKERS),
            per_worker(settings.MAX_QUEUE, settings.WORKERS),
            settings.QUEUE_TIMEOUT_S,
        )
        self.request_timeout = aiohttp.ClientTimeout(total=settings.REQUEST_TIMEOUT_S)
        self.stream_timeout = aiohttp.ClientTimeout(
            total=settings.REQUEST_TIMEOUT_S, sock_read=settings.STREAM_IDLE_TIMEOUT_S
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # No cookie jar: a cookie the engine sets belongs to the client that got it, never to the next one.
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.readiness.bind(self.session)
        self.media_fetcher = MediaFetcher(MediaPolicy.from_settings(self.settings, frozenset()).urls)
        await self.media_fetcher.start()

    async def close(self) -> None:
        await self.media_fetcher.close()
        await self.session.close()

    def model_dir(self) -> Path | None:
        """The local model directory, when this container runs the engine."""
        if self.settings.ENGINE_URL:
            return None
        status = self.readiness.lifecycle()
        if status and status.model_path:
            return Path(status.model_path)
        return Path(self.settings.MODEL_NAME) if self.settings.is_local_model else None

    def modalities(self) -> frozenset[str]:
        """What clients may send: the model's modalities less those turned off (limit 0)."""
        policy = self.media_policy
        return frozenset(kind for kind in policy.modalities if kind == "text" or policy.accepts(kind))

    @property
    def media_policy(self) -> MediaPolicy:
        """Built once the model is known; until then the limits alone decide."""
        if self._media_policy is not None:
            return self._media_policy
        model_dir = self.model_dir()
        policy = MediaPolicy.from_settings(self.settings, detect_modalities(model_dir))
        if model_dir is not None or self.settings.ENGINE_URL:
            self._media_policy = policy
        return policy

    async def engine_facts(self) -> dict[str, Any]:
        """max_model_len and version as the engine reports them; cached once known."""
        if self._engine_facts:
            return self._engine_facts
        facts: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with self.session.get(f"{self.engine_url}/v1/models", timeout=timeout) as response:
                models = (await response.json()).get("data") or [{}]
                facts["max_model_len"] = models[0].get("max_model_len")
            async with self.session.get(f"{self.engine_url}/version", timeout=timeout) as response:
                facts["version"] = (await response.json()).get("version")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return facts
        self._engine_facts = facts
        return facts

    async def engine_unreachable_error(self) -> APIError:
        snapshot = await self.readiness.snapshot()
        status = snapshot.status
        if snapshot.phase == Phase.FAILED.value and status and status.error:
            return unavailable(f"Model failed to start: {status.error}", retry_after_s=30, code="startup_failed")
        if snapshot.initializing:
            return unavailable(f"Model is not ready yet (phase: {snapshot.phase}); retry shortly.", code="not_ready")
        if snapshot.phase == Phase.DRAINING.value:
            return unavailable("Server is shutting down; retry on another replica.", code="draining")
        if self.settings.ENGINE_URL:
            # A remote engine is restarted or redeployed on its own: an outage that clients wait out.
            return unavailable(
                "The engine (ENGINE_URL) is not reachable; retry shortly, /health reports when it is back.",
                code="engine_unavailable",
            )
        return APIError(
            502, "The engine is not reachable; it may have crashed.", code="engine_unavailable",
            cause="engine_error", headers={"Retry-After": "5"},
        )
