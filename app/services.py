"""The long-lived parts of one wrapper process, built once and handed to who needs them.

This is the composition root: the key check, the route table, engine slots
and the drain (`Gateway`), the lifecycle view (`Readiness`), the engine
client, the media checks, the relay and the conversation store are created
here from the settings, started and closed together, and passed explicitly
to the front door and the routes. Nothing is looked up in `app.state`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from app.auth import KeyCheck
from app.capabilities import Capabilities, model_capabilities
from app.config import ConfigError, Settings
from app.generate.store import ConversationStore, build_store
from app.media.service import MediaService
from app.proxy.engine import EngineClient
from app.proxy.gateway import Gateway
from app.proxy.models import ModelRouter
from app.proxy.relay import Relay
from app.readiness import Readiness
from app.routes import RouteTable, build_route_table

log = logging.getLogger("app.serve")


@dataclass
class Services:
    settings: Settings
    keys: KeyCheck
    routes: RouteTable
    gateway: Gateway
    readiness: Readiness
    engine: EngineClient
    media: MediaService
    relay: Relay
    store: ConversationStore | None
    models: ModelRouter | None  # with MODELS: which engine a request's model goes to
    _capabilities: Capabilities | None = field(default=None, init=False)

    @classmethod
    def build(cls, settings: Settings, status_file: Path | None = None, control_socket: str | None = None) -> Services:
        gateway = Gateway(settings)
        models = None
        if settings.catalog is not None:
            if control_socket is None:
                raise ConfigError("MODELS needs the supervisor: start the image with scripts/start.sh.")
            models = ModelRouter(settings.catalog.names, control_socket, settings.REQUEST_TIMEOUT_S)
        engine_url = None if models is not None else settings.engine_url
        readiness = Readiness(status_file, engine_url, is_draining=lambda: gateway.draining)
        if models is not None:
            models.states = lambda: status.models if (status := readiness.lifecycle()) else {}
        engine = EngineClient(settings, readiness)
        media = MediaService(settings, readiness)
        routes = build_route_table()
        if settings.HEALTH_CHECK_PATH != "/ping":
            routes.add_alias(settings.HEALTH_CHECK_PATH, routes.match("/ping"))
        return cls(
            settings=settings,
            keys=KeyCheck(settings.api_keys),
            routes=routes,
            gateway=gateway,
            readiness=readiness,
            engine=engine,
            media=media,
            relay=Relay(settings, engine, media, models),
            store=build_store(settings),
            models=models,
        )

    async def start(self) -> None:
        await self.engine.start()
        if self.models is not None:
            await self.models.start()
        await self.media.start()
        if self.store is not None:
            await self.store.start()

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
        await self.media.close()
        if self.models is not None:
            await self.models.close()
        await self.engine.close()

    def capabilities(self) -> Capabilities:
        """What the served model answers; final once its directory is known."""
        if self._capabilities is not None:
            return self._capabilities
        model_dir = self.readiness.model_dir(self.settings)
        capabilities = model_capabilities(self.settings, model_dir)
        if model_dir is not None or self.settings.ENGINE_URL:
            self._capabilities = capabilities
        return capabilities

    def loaded_engines(self) -> dict[str, str]:
        """With MODELS: the engine URL of every loaded model, by served name, as the supervisor publishes it."""
        if self.models is None:
            return {}
        return {
            name: str(state["url"]) for name, state in self.models.states().items()
            if state.get("state") == "loaded" and state.get("url")
        }

    async def drain(self) -> None:
        """Let admitted requests finish (DRAIN_TIMEOUT_S), then end the rest with an error."""
        await self.gateway.drain(abort=self.engine.abort_all)
