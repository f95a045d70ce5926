"""Baseline: the smallest FastAPI + aiohttp pass-through, to measure the wrapper against.

It does only what any proxy must: read the request body, send it upstream on a
pooled aiohttp session, and relay the answer (SSE streams as they arrive, via
StreamingResponse over `iter_any()`). No metrics, logs or checks, so the
wrapper's extra work shows as the difference to this baseline.

Run: `python -m bench.passthrough_aiohttp --port 8511 --upstream http://127.0.0.1:8500`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse


def create_app(upstream: str) -> FastAPI:
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(upstream, connector=connector, auto_decompress=False) as session:
            state["session"] = session
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/{path:path}")
    async def proxy(path: str, request: Request) -> Response:
        body = await request.body()
        resp = await state["session"].post(f"/v1/{path}", data=body, headers={"Content-Type": "application/json"})
        content_type = resp.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(relay(), status_code=resp.status, media_type=content_type)
        data = await resp.read()
        return Response(data, status_code=resp.status, media_type=content_type)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the engine, e.g. http://127.0.0.1:8500")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream.rstrip("/")), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
