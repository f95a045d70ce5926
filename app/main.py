"""The wrapper application: probes, deployment facts, metrics, `/generate` and the engine relay.

`create_app(services)` returns the ASGI application uvicorn serves, outermost
first: CORS (when enabled), the access log (request id, metrics, one log
line), the front door (route table, key, size, slot, body), then either the
engine relay or the FastAPI application with these routes. Every request
passes the front door, so the routes here need no auth or limits of their
own. The relay, the hot path, never enters FastAPI: its middleware stack
(error middleware, exception middleware, router) would wrap every request
and every chunk in layers the relay does not use.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from app import __version__
from app.admin import build_admin_router
from app.errors import APIError
from app.frontdoor import FrontDoor
from app.generate.routes import GenerateService, build_router
from app.generate.validation import request_validation_error_handler
from app.lifecycle.status import Phase
from app.observability import metrics
from app.observability.access import AccessLog
from app.observability.gpu import gpu_info
from app.services import Services

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def create_app(services: Services) -> ASGIApp:
    settings = services.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(title="vllm-inference-api", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    app.add_exception_handler(RequestValidationError, request_validation_error_handler)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    app.include_router(_operations_router(services))
    app.include_router(build_router(GenerateService(settings, services.engine, services.store, services.models)))
    app.include_router(build_admin_router(services.models))

    served: ASGIApp = AccessLog(FrontDoor(
        app,
        routes=services.routes,
        keys=services.keys,
        gateway=services.gateway,
        relay=services.relay,
        max_body_bytes=settings.MAX_REQUEST_BYTES,
        body_timeout_s=settings.BODY_READ_TIMEOUT_S,
        public_operator_routes=settings.PUBLIC_METRICS,
    ))
    if settings.cors_allow_origins:
        served = CORSMiddleware(
            served,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    return served


def _operations_router(services: Services) -> APIRouter:
    """Probes, /info and /metrics: what load balancers, Prometheus and operators read."""
    settings = services.settings
    readiness = services.readiness
    started_at = time.time()
    router = APIRouter()

    @router.get("/ping", include_in_schema=False)
    async def ping() -> Response:
        """RunPod load balancer semantics: 204 initializing, 200 ready, 503 otherwise."""
        snapshot = await readiness.snapshot()
        if snapshot.ready:
            return JSONResponse({"status": "healthy"})
        if snapshot.initializing:
            return Response(status_code=204)
        error = snapshot.status.error if snapshot.status else None
        return JSONResponse({"status": snapshot.phase, "error": error}, status_code=503)

    if settings.HEALTH_CHECK_PATH != "/ping":
        router.add_api_route(settings.HEALTH_CHECK_PATH, ping, methods=["GET"], include_in_schema=False)

    @router.get("/health")
    async def health() -> JSONResponse:
        snapshot = await readiness.snapshot()
        body: dict[str, Any] = {"phase": snapshot.phase, "ready": snapshot.ready, "engine_healthy": snapshot.engine_healthy}
        if snapshot.status:
            body.update(snapshot.status.to_json())
            body["phase"] = snapshot.phase
        body["model"] = settings.MODEL_NAME
        body["served_model_name"] = settings.served_model_name
        return JSONResponse(body, status_code=200 if snapshot.ready else 503)

    @router.get("/health/live")
    async def live() -> JSONResponse:
        """Kubernetes liveness: the wrapper process answers."""
        return JSONResponse({"status": "alive"})

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        """Kubernetes readiness: the engine serves requests and the server is not draining."""
        snapshot = await readiness.snapshot()
        return JSONResponse({"ready": snapshot.ready, "phase": snapshot.phase}, status_code=200 if snapshot.ready else 503)

    @router.get("/metrics")
    async def metrics_route() -> Response:
        if services.models is not None:
            body, content_type = await metrics.render_models_metrics(services.engine.session, services.loaded_engines())
        else:
            body, content_type = await metrics.render_metrics(services.engine.session, services.engine.url)
        return Response(body, media_type=content_type)

    @router.get("/info")
    async def info() -> JSONResponse:
        if services.models is not None:
            return JSONResponse({**await _models_info(services), "uptime_s": round(time.time() - started_at, 3)})
        status = readiness.lifecycle()
        engine = await services.engine.facts()
        modalities = sorted(services.media.modalities())
        limits = {"image": settings.IMAGE_LIMIT, "video": settings.VIDEO_LIMIT}
        gpu = gpu_info()
        return JSONResponse({
            "model": settings.MODEL_NAME,
            "revision": status.resolved_revision if status else None,
            "served_model_name": settings.served_model_name,
            "served_model_names": list(settings.served_model_names),
            "capabilities": services.capabilities().to_json(),
            "max_model_len": engine.get("max_model_len"),
            "modalities": modalities,
            "media_limits": {name: limit for name, limit in limits.items() if name in modalities},
            "versions": {"wrapper": __version__, "engine": engine.get("version")},
            "device": gpu or {"type": "cpu"},
            "engine_url": None if settings.ENGINE_URL is None else services.engine.url,
            "config": settings.redacted(),
            "uptime_s": round(time.time() - started_at, 3),
            "startup": status.to_json()["phase_seconds"] if status else None,
            "phase": status.phase.value if status else Phase.READY.value,
            "error": status.error if status else None,
            # The engine's last lines after a failed start: operators only, never on the open probes.
            "engine_log_tail": status.engine_log_tail if status else [],
        })

    return router


async def _models_info(services: Services) -> dict[str, Any]:
    """/info of a deployment of several models (MODELS): the deployment's facts, then each model's."""
    settings = services.settings
    assert settings.catalog is not None and services.models is not None
    status = services.readiness.lifecycle()
    states = services.models.states()
    deployment = settings.redacted()
    models: dict[str, Any] = {}
    for model in settings.catalog:
        state = states.get(model.name, {})
        loaded = state.get("state") == "loaded" and state.get("url")
        engine = await services.engine.facts(str(state["url"])) if loaded else {}
        models[model.name] = {
            "model": model.source,
            "state": str(state.get("state", "unloaded")),
            "error": state.get("error"),
            "max_model_len": engine.get("max_model_len"),
            "engine_version": engine.get("version"),
            "media_limits": {"image": model.settings.IMAGE_LIMIT, "video": model.settings.VIDEO_LIMIT},
            # The settings in which this model's engine differs from the deployment's.
            "config": {name: value for name, value in model.settings.redacted().items() if value != deployment[name]},
        }
    return {
        "models": models,
        "max_loaded_models": settings.MAX_LOADED_MODELS,
        "versions": {"wrapper": __version__},
        "device": gpu_info() or {"type": "cpu"},
        "config": deployment,
        "startup": status.to_json()["phase_seconds"] if status else None,
        "phase": status.phase.value if status else Phase.READY.value,
        "error": status.error if status else None,
    }
