"""What the wrapper tells probes: the lifecycle phase plus a live engine check.

The supervisor publishes the lifecycle phase (preflight, downloading, loading,
warmup, ready, failed) in the status file; this wrapper process adds what only it
knows: whether it is draining, and whether the engine answers its own
`/health` right now. A ready lifecycle with a silent engine is reported as
`engine_unavailable`, so probes never claim a health the engine lacks.

The engine check is cached for ENGINE_CHECK_TTL_S. A relayed request that saw
the engine vanish voids the cache and any check still in flight: a check that
began before a crash must not report the crashed engine healthy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from app.config import Settings
from app.lifecycle.status import Phase, StartupStatus, read_status

ENGINE_UNAVAILABLE = "engine_unavailable"
ENGINE_CHECK_TTL_S = 0.5
ENGINE_CHECK_TIMEOUT_S = 1.0
INITIALIZING = frozenset(phase.value for phase in (Phase.PREFLIGHT, Phase.DOWNLOADING, Phase.LOADING, Phase.WARMUP))


@dataclass(frozen=True)
class Snapshot:
    phase: str
    status: StartupStatus | None
    engine_healthy: bool

    @property
    def ready(self) -> bool:
        return self.phase == Phase.READY.value

    @property
    def initializing(self) -> bool:
        return self.phase in INITIALIZING


class Readiness:
    def __init__(self, status_file: Path | None, engine_url: str | None, is_draining: Callable[[], bool]) -> None:
        """`engine_url` None: several models (MODELS), each engine started on demand; ready means the
        supervisor answers for them, and each model's state is in the status file."""
        self.status_file = status_file
        self.engine_url = engine_url
        self._is_draining = is_draining
        self._session: aiohttp.ClientSession | None = None
        self._checked_at = 0.0
        self._engine_ok = False
        self._failures_seen = 0
        self._check_lock = asyncio.Lock()

    def bind(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    def lifecycle(self) -> StartupStatus | None:
        return read_status(self.status_file) if self.status_file else None

    def model_dir(self, settings: Settings) -> Path | None:
        """The served model's directory, once known, when this container runs the engine."""
        if settings.ENGINE_URL:
            return None
        status = self.lifecycle()
        if status and status.model_path:
            return Path(status.model_path)
        return Path(settings.MODEL_NAME) if settings.is_local_model else None

    async def engine_healthy(self) -> bool:
        if self.engine_url is None:
            return True
        if time.monotonic() - self._checked_at < ENGINE_CHECK_TTL_S:
            return self._engine_ok
        async with self._check_lock:
            if time.monotonic() - self._checked_at >= ENGINE_CHECK_TTL_S:
                failures_seen = self._failures_seen
                healthy = await self._probe_engine()
                if failures_seen == self._failures_seen:
                    self._engine_ok, self._checked_at = healthy, time.monotonic()
                else:
                    # The engine vanished under a relayed request while this check ran.
                    self._engine_ok, self._checked_at = False, 0.0
        return self._engine_ok

    async def _probe_engine(self) -> bool:
        assert self._session is not None, "Readiness.bind() was not called"
        try:
            timeout = aiohttp.ClientTimeout(total=ENGINE_CHECK_TIMEOUT_S)
            async with self._session.get(f"{self.engine_url}/health", timeout=timeout) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def mark_engine_failed(self) -> None:
        """Called when a relayed request saw the engine vanish: re-check on next probe."""
        self._failures_seen += 1
        self._checked_at = 0.0

    async def snapshot(self) -> Snapshot:
        status = self.lifecycle()
        if self._is_draining():
            return Snapshot(Phase.DRAINING.value, status, False)
        phase = status.phase.value if status else Phase.READY.value
        if phase != Phase.READY.value:
            return Snapshot(phase, status, False)
        healthy = await self.engine_healthy()
        return Snapshot(phase if healthy else ENGINE_UNAVAILABLE, status, healthy)
