"""The media checks of one wrapper process: the policy, once the model is known, and the fetcher.

The policy depends on what the served model takes (`detect_modalities` on
its directory), which the supervisor learns only after the download; until
then the limits alone decide. With MODELS each model has its own policy, from
its own settings (its IMAGE_LIMIT and VIDEO_LIMIT in MODELS_CONFIG) and, for a
local directory, its modalities; a Hub model's modalities are left to its
engine. The fetcher's connection pool lives as long as the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.config import Settings
from app.media.fetch import MediaFetcher
from app.media.modalities import detect_modalities
from app.media.policy import MediaPolicy
from app.media.routes import MediaCounts, prepare_media
from app.readiness import Readiness


class MediaService:
    def __init__(self, settings: Settings, readiness: Readiness) -> None:
        self._settings = settings
        self._readiness = readiness
        self._policy: MediaPolicy | None = None
        self._fetcher = MediaFetcher(MediaPolicy.from_settings(settings, frozenset()).urls)
        catalog = settings.catalog
        self._model_policies = {} if catalog is None else {
            model.name: MediaPolicy.from_settings(model.settings, detect_modalities(_local_dir(model.source)))
            for model in catalog
        }

    async def start(self) -> None:
        await self._fetcher.start()

    async def close(self) -> None:
        await self._fetcher.close()

    async def prepare(self, route: str, payload: dict[str, Any], model: str | None = None) -> MediaCounts:
        """Check, count and inline the media of one JSON body of `route` (in place).

        `model` is the catalog model the body goes to (with MODELS): its own limits apply.
        """
        policy = self._model_policies[model] if model is not None else self.policy
        return await prepare_media(route, payload, policy, self._fetcher)

    @property
    def policy(self) -> MediaPolicy:
        """Built once the model is known; until then the limits alone decide."""
        if self._policy is not None:
            return self._policy
        model_dir = self._model_dir()
        policy = MediaPolicy.from_settings(self._settings, detect_modalities(model_dir))
        if model_dir is not None or self._settings.ENGINE_URL:
            self._policy = policy
        return policy

    def modalities(self) -> frozenset[str]:
        """What clients may send: the model's modalities less those turned off (limit 0)."""
        policy = self.policy
        return frozenset(kind for kind in policy.modalities if kind == "text" or policy.accepts(kind))  # type: ignore[arg-type]

    def _model_dir(self) -> Path | None:
        return self._readiness.model_dir(self._settings)


def _local_dir(source: str) -> Path | None:
    path = Path(source)
    return path if path.is_dir() else None
