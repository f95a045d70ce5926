"""The front door: every request, whatever its route, passes here before any costly work.

In order, from the cheapest check to the first costly step:

1. the route is looked up in the fixed table (`app.routes`); its label is what
   metrics and the log line use, so random paths share one label, `other`;
2. the API key is checked from the headers alone (probes are open; /metrics
   and /info take the key unless PUBLIC_METRICS): an unauthenticated client
   never gets a byte of its body read, and unknown paths answer 401 before 404;
3. a declared `Content-Length` over MAX_REQUEST_BYTES is refused at once;
4. requests that make the engine work take an engine slot (`Gateway.enter`:
   503 while draining, 429/503 when full) before their body is read, so the
   slots bound the memory and CPU of bodies, media and generation together;
5. the body is read up to MAX_REQUEST_BYTES (chunked uploads included) within
   BODY_READ_TIMEOUT_S, so a client that sends a byte every few seconds does
   not hold a connection and a slot for long (no deadline is needed for a body
   the server says has fully arrived: `app.request_progress`).

What the server still reads of a body it refused unread is bounded by the
server's protocol (`app.serve.GuardedHttpProtocol`). Then the request goes to the engine relay, or to the wrapper's own routes
with the body handed over as it was read.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from app.auth import KeyCheck, header
from app.errors import APIError
from app.observability.record import RequestRecord
from app.proxy.gateway import Gateway
from app.proxy.reply import send_error
from app.request_progress import progress_of
from app.routes import Route, RouteTable

Scope = dict[str, Any]
CALLER_STATE = "caller"


class ClientGone(Exception):
    """The client closed the connection before its body was complete."""


class Relay(Protocol):
    async def __call__(
        self, scope: Scope, receive: Any, send: Any, route: Route, body: bytes, record: RequestRecord
    ) -> None: ...


class FrontDoor:
    def __init__(
        self,
        app: Any,
        *,
        routes: RouteTable,
        keys: KeyCheck,
        gateway: Gateway,
        relay: Relay,
        max_body_bytes: int,
        body_timeout_s: float,
        public_operator_routes: bool,
    ) -> None:
        self.app = app
        self._routes = routes
        self._keys = keys
        self._gateway = gateway
        self._relay = relay
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s
        self._public_operator_routes = public_operator_routes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._routes.match(scope["path"])
        record: RequestRecord = scope["state"]["record"]
        record.route = route.label
        try:
            scope["state"][CALLER_STATE] = self._authorize(route, scope)
            _check_method(route, scope["method"])
            self._check_declared_size(scope["headers"])
            admitted = route.admitted
            if admitted:
                await self._gateway.enter(record)
            try:
                body = b""
                if route.body != "none" and _has_body(scope["headers"]):
                    body = await self._read_body(scope, receive)
                if route.relayed:
                    await self._relay(scope, receive, send, route, body, record)
                else:
                    await self.app(scope, _replay(body, receive), send)
            finally:
                if admitted:
                    self._gateway.leave()
        except APIError as error:
            record.error_cause = error.cause
            await send_error(send, error)
        except ClientGone:
            record.status, record.error_cause = 499, "client_disconnected"

    def _authorize(self, route: Route, scope: Scope) -> str | None:
        """The key the caller presented (None when no key is needed or configured)."""
        if route.access == "public" or (route.access == "operator" and self._public_operator_routes):
            return None
        return self._keys.verify(header(scope["headers"], b"authorization"))

    def _check_declared_size(self, headers: list[tuple[bytes, bytes]]) -> None:
        declared = header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)

    async def _read_body(self, scope: Scope, receive: Any) -> bytes:
        progress = progress_of(scope)
        if progress is not None and progress.body_complete:
            return await read_body(receive, self._max_body_bytes)
        try:
            async with asyncio.timeout(self._body_timeout_s):
                return await read_body(receive, self._max_body_bytes)
        except TimeoutError:
            raise APIError(
                408,
                f"The request body did not arrive within BODY_READ_TIMEOUT_S={self._body_timeout_s:g}s; "
                "send it faster or in a smaller request.",
                code="request_timeout",
            ) from None


def _check_method(route: Route, method: str) -> None:
    if route.handler == "unknown":
        raise APIError(404, "No such route on this server; see /v1/models and the README for the routes it serves.",
                       code="not_found")
    if method not in route.methods:
        allowed = ", ".join(sorted(route.methods))
        raise APIError(405, f"{route.label} does not take {method}; use {allowed}.", code="method_not_allowed",
                       headers={"Allow": allowed})


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    declared = header(headers, b"content-length")
    if declared is not None:
        return declared.strip() not in (b"", b"0")
    return header(headers, b"transfer-encoding") is not None


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole body, or 413 as soon as it grows past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds MAX_REQUEST_BYTES ({limit} bytes).", code="request_too_large")


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands over the body already read, then the server's own messages."""
    delivered = False

    async def replayed() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
