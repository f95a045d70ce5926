"""One record, one metrics update and one log line for every request.

The outermost middleware of the wrapper: it assigns the request id (honouring
an incoming `X-Request-ID` of a safe form), returns it as a response header,
and when the request ends hands the filled `RequestRecord` to metrics and the
log. The route label comes from the front door's fixed table, so no client
can add series. Probe routes are logged at DEBUG so that load balancer
polling does not bury the inference traffic.

Metrics and the log line are not on the request's path: a request's last
bytes leave when its task yields to the event loop, so they are done in the
next loop iteration, after the response was written, and all requests that
ended in one iteration are handled together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

from app.auth import header
from app.observability import metrics
from app.observability.record import RequestRecord
from app.observability.request_log import log_request
from app.routes import OTHER, PROBE_LABELS

log = logging.getLogger("app.observability")

# A client's X-Request-ID is kept when it is short and of a safe alphabet (it
# reaches log lines and the engine); anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class Observer:
    """Finished requests to metrics and the log, in the loop iteration after they ended."""

    def __init__(self) -> None:
        self._finished: list[RequestRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, record: RequestRecord) -> None:
        if not self._finished:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()  # the server's one loop: asked once (a getpid each time)
            self._loop.call_soon(self.flush)
        self._finished.append(record)

    def flush(self) -> None:
        finished, self._finished = self._finished, []
        for record in finished:
            try:
                metrics.observe_request(record)
                log_request(record, probe=record.route in PROBE_LABELS)
            except Exception:  # one bad record must not cost the others their line
                log.exception("could not record a finished request", extra={"request_id": record.request_id})


class AccessLog:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._observer = Observer()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope["headers"], b"x-request-id")
        request_id = incoming.decode("latin-1") if incoming else ""
        if not REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(16).hex()
        client = scope.get("client")
        record = RequestRecord(
            request_id=request_id,
            method=scope["method"][:16],
            path=scope["path"],
            route=OTHER,  # the front door sets the route's label
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
            self._observer.add(record)
