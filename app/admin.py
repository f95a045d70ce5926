"""Admin routes of a multi-model deployment (MODELS): list, load and unload models.

They take the API key like the inference routes (never PUBLIC_METRICS): loading
and unloading decide what the memory holds. The model is named in the JSON body
(`{"model": "name"}`), since Hub ids hold a slash. Without MODELS they answer 404.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from app.errors import APIError
from app.proxy.models import ModelRouter


def build_admin_router(models: ModelRouter | None) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def configured() -> ModelRouter:
        if models is None:
            raise APIError(404, "Admin model routes need several models (MODELS); this server serves one.",
                           code="not_found")
        return models

    @router.get("/admin/models")
    async def list_models() -> Response:
        return Response(configured().listing(), media_type="application/json")

    @router.post("/admin/models/load")
    async def load(request: Request) -> Response:
        router_ = configured()
        await router_.load(_model_of(await request.body()))
        return Response(router_.listing(), media_type="application/json")

    @router.post("/admin/models/unload")
    async def unload(request: Request) -> Response:
        router_ = configured()
        await router_.unload(_model_of(await request.body()))
        return Response(router_.listing(), media_type="application/json")

    return router


def _model_of(body: bytes) -> object:
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise APIError(400, 'Send the model as JSON: {"model": "name"}.', code="invalid_json") from None
    return payload.get("model") if isinstance(payload, dict) else None
