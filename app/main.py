"""The wrapper application: probes, deployment facts, metrics and the proxy.

`app` is what uvicorn serves. The `/v1/*` proxy is an ASGI middleware
(`app.proxy.relay.V1Proxy`) in front of the FastAPI router, so inference
traffic skips routing entirely; everything else is an ordinary FastAPI route
defined here. Middleware order, outermost first: CORS (when enabled), the
access log (request id, metrics, one log line), the proxy, FastAPI.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from app import __version__
from app.config import Settings, load_settings
from app.errors import APIError, unavailable
from app.generate.routes import router as generate_router
from app.generate.store import build_store
from app.generate.validation import request_validation_error_handler
from app.lifecycle.status import STATUS_FILE_ENV, Phase
from app.observability import metrics
from app.observability.access import AccessLog
from app.observability.gpu import gpu_info
from app.proxy.gateway import Gateway
from app.proxy.relay import V1Proxy


def create_app(settings: Settings | None = None, status_file: Path | None = None) -> FastAPI:
    settings = settings or load_settings()
    if status_file is None and os.environ.get(STATUS_FILE_ENV):
        status_file = Path(os.environ[STATUS_FILE_ENV])
    gateway = Gateway(settings, status_file)
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        app.state.upstream = gateway.session
        app.state.conversations = build_store(settings)
        if app.state.conversations is not None:
            await app.state.conversations.start()
        try:
            yield
        finally:
            if app.state.conversations is not None:
                await app.state.conversations.close()
            await gateway.close()

    app = FastAPI(title="vllm-inference-api", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.gateway = gateway
    app.state.model_max_len = None

    def require_key(request: Request) -> None:
        gateway.keys.verify(request.headers.get("authorization", "").encode("latin-1") or None)

    def require_operator_key(request: Request) -> None:
        if not settings.PUBLIC_METRICS:
            require_key(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    app.add_exception_handler(RequestValidationError, request_validation_error_handler)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.get("/ping", include_in_schema=False)
    async def ping() -> Response:
        """RunPod load balancer semantics: 204 initializing, 200 ready, 503 otherwise."""
        snapshot = await gateway.readiness.snapshot()
        if snapshot.ready:
            return JSONResponse({"status": "healthy"})
        if snapshot.initializing:
            return Response(status_code=204)
        error = snapshot.status.error if snapshot.status else None
        return JSONResponse({"status": snapshot.phase, "error": error}, status_code=503)

    @app.get("/health")
    async def health() -> JSONResponse:
        snapshot = await gateway.readiness.snapshot()
        body: dict[str, Any] = {"phase": snapshot.phase, "ready": snapshot.ready, "engine_healthy": snapshot.engine_healthy}
        if snapshot.status:
            body.update(snapshot.status.to_json())
            body["phase"] = snapshot.phase
        body["model"] = settings.MODEL_NAME
        body["served_model_name"] = settings.served_model_name
        return JSONResponse(body, status_code=200 if snapshot.ready else 503)

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """Kubernetes liveness: the wrapper process answers."""
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """Kubernetes readiness: the engine serves requests and the server is not draining."""
        snapshot = await gateway.readiness.snapshot()
        return JSONResponse({"ready": snapshot.ready, "phase": snapshot.phase}, status_code=200 if snapshot.ready else 503)

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        require_operator_key(request)
        body, content_type = await metrics.render_metrics(gateway.session, gateway.engine_url)
        return Response(body, media_type=content_type)

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        require_operator_key(request)
        status = gateway.readiness.lifecycle()
        engine = await gateway.engine_facts()
        modalities = sorted(gateway.modalities())
        limits = {"image": settings.IMAGE_LIMIT, "video": settings.VIDEO_LIMIT}
        gpu = gpu_info()
        return JSONResponse({
            "model": settings.MODEL_NAME,
            "revision": status.resolved_revision if status else None,
            "served_model_name": settings.served_model_name,
            "max_model_len": engine.get("max_model_len"),
            "modalities": modalities,
            "media_limits": {name: limit for name, limit in limits.items() if name in modalities},
            "versions": {"wrapper": __version__, "engine": engine.get("version")},
            "device": gpu or {"type": "cpu"},
            "engine_url": None if settings.ENGINE_URL is None else gateway.engine_url,
            "config": settings.redacted(),
            "uptime_s": round(time.time() - started_at, 3),
            "startup": status.to_json()["phase_seconds"] if status else None,
            "phase": status.phase.value if status else Phase.READY.value,
        })

    async def simple_api_guard(request: Request) -> AsyncIterator[None]:
        """/generate and /conversations need the key; a generation also passes the
        drain check and the backpressure queue like a /v1 request."""
        require_key(request)
        if request.method != "POST":
            yield
            return
        if gateway.readiness.draining:
            raise unavailable("Server is shutting down; retry on another replica.", code="draining")
        app.state.model_max_len = (await gateway.engine_facts()).get("max_model_len")
        record = request.scope["state"]["record"]
        record.queue_wait_s = await gateway.admission.acquire()
        metrics.request_started()
        try:
            yield
        finally:
            metrics.request_finished()
            gateway.admission.release()

    app.include_router(generate_router, dependencies=[Depends(simple_api_guard)])

    app.add_middleware(V1Proxy, gateway=gateway)
    app.add_middleware(AccessLog)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    return app


app = create_app()
