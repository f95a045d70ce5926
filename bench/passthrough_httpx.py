"""Reference baseline: the smallest FastAPI + httpx pass-through.

The same proxy as `passthrough_aiohttp`, with httpx as the upstream client, the
choice many gateways make; it shows how much the HTTP client alone costs.

Run: `python -m bench.passthrough_httpx --port 8512 --upstream http://127.0.0.1:8500`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse


def create_app(upstream: str) -> FastAPI:
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
        async with httpx.AsyncClient(base_url=upstream, limits=limits, timeout=600.0) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/{path:path}")
    async def proxy(path: str, request: Request) -> Response:
        client = state["client"]
        upstream_request = client.build_request(
            "POST", f"/v1/{path}", content=await request.body(), headers={"Content-Type": "application/json"}
        )
        resp = await client.send(upstream_request, stream=True)
        content_type = resp.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, media_type=content_type)
        data = await resp.aread()
        await resp.aclose()
        return Response(data, status_code=resp.status_code, media_type=content_type)

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
