"""One record, one metrics update and one log line for every request.

The outermost middleware of the wrapper: it assigns the request id (honouring
an incoming `X-Request-ID`), returns it as a response header, and when the
request ends hands the filled `RequestRecord` to metrics and the log. Probe
routes are logged at DEBUG so that load balancer polling does not bury the
inference traffic.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from app.auth import header
from app.observability import metrics
from app.observability.record import RequestRecord
from app.observability.request_log import log_request

PROBE_PATHS = frozenset({"/ping", "/health", "/health/live", "/health/ready", "/metrics"})
MAX_REQUEST_ID_LENGTH = 128


def route_of(path: str) -> str:
    """A bounded label for metrics: known routes as they are, everything else folded."""
    if path.startswith("/v1/"):
        return path if path.count("/") <= 3 else "/v1/other"
    if path in PROBE_PATHS or path in ("/info", "/generate", "/conversations"):
        return path
    if path.startswith("/conversations/"):
        return "/conversations/{id}"
    return "other"


class AccessLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope["headers"], b"x-request-id")
        request_id = (
            incoming.decode("latin-1")[:MAX_REQUEST_ID_LENGTH] if incoming and incoming.isascii() else uuid.uuid4().hex
        )
        client = scope.get("client")
        path = scope["path"]
        record = RequestRecord(
            request_id=request_id,
            method=scope["method"],
            path=path,
            route=route_of(path),
            client=client[0] if client else None,
        )
        scope.setdefault("state", {})["record"] = record
        request_id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            record.status, record.error_cause = 500, "internal_error"
            raise
        finally:
            if record.finished is None:
                record.finished = time.perf_counter()
            metrics.observe_request(record)
            log_request(record, probe=path in PROBE_PATHS)
