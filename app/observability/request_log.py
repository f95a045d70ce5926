"""The one summary line the wrapper writes per request (logger `app.access`).

It replaces uvicorn's access log with what an operator follows an LLM
request by: model, stream, latency, time to first token, tokens and token
rate, media counts, queue wait and the error cause. It carries counts and
timings only: never message text, prompts or media data.
"""

from __future__ import annotations

import logging

from app.observability.logging import log_fields
from app.observability.record import RequestRecord

ACCESS_LOGGER = "app.access"

_access_logger = logging.getLogger(ACCESS_LOGGER)


# Clients choose the path and the model name; a log line carries at most this much of each.
MAX_CLIENT_VALUE = 256


def _capped(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_CLIENT_VALUE else value[:MAX_CLIENT_VALUE] + "…"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def request_summary(record: RequestRecord) -> dict[str, object]:
    """The fields of the summary line; `error` only when the request failed."""
    tokens_per_s = record.tokens_per_s
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": _capped(record.path),
        "status": record.status,
        "model": _capped(record.model),
        "stream": record.stream,
        "duration_ms": _ms(record.duration_s),
        "ttft_ms": _ms(record.ttft_s),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
        "modalities": {"text": record.text_parts, "image": record.images, "video": record.videos},
        "client": record.client,
        "queue_wait_ms": _ms(record.queue_wait_s),
    }
    if record.load_wait_s is not None:
        fields["load_wait_ms"] = _ms(record.load_wait_s)
    if record.error_cause:
        fields["error"] = record.error_cause
    return fields


def log_request(record: RequestRecord, probe: bool = False) -> None:
    """Write the summary line of a finished request.

    Probes (`probe=True`: /ping, /health, /metrics polled by load balancers
    and Prometheus) are logged at DEBUG, whatever they answer, so that they do
    not bury the inference traffic; server errors at WARNING, the rest at INFO.
    """
    if probe:
        level = logging.DEBUG
    elif record.status >= 500:
        level = logging.WARNING
    else:
        level = logging.INFO
    if _access_logger.isEnabledFor(level):
        log_fields(_access_logger, level, "request", request_summary(record))
