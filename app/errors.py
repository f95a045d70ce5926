"""OpenAI-shaped errors.

Every error the wrapper produces itself uses the body OpenAI clients parse:
``{"error": {"message", "type", "param", "code"}}``. The `cause` attribute is
not sent; it labels the error in metrics and in the request log line
(client_error, engine_error, timeout, rejected, auth, unavailable).

The engine's own errors mostly have that shape too, but not all: FastAPI's
``{"detail": ...}`` (a body it cannot parse, an unknown route) and plain text
get the same shape before they reach the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "engine_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    cause: str = "client_error"
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def unavailable(message: str, retry_after_s: float = 5.0, code: str = "unavailable") -> APIError:
    return APIError(503, message, code=code, cause="unavailable", headers={"Retry-After": str(max(1, round(retry_after_s)))})


def openai_error_body(status: int, body: bytes) -> bytes | None:
    """`body`, an engine's error answer, in the OpenAI shape; None when it already has it."""
    answer = _json(body)
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return None
    return engine_error(status, body).json_bytes()


def engine_error(status: int, body: bytes) -> APIError:
    """The engine's error answer (OpenAI shape, FastAPI's `detail`, or text) as an `APIError`."""
    answer = _json(body)
    code: str | None = None
    param: str | None = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        message = str(error.get("message") or "")
        code = error.get("code") if isinstance(error.get("code"), str) else None
        param = error.get("param") if isinstance(error.get("param"), str) else None
    elif isinstance(answer, dict) and "detail" in answer:
        message = _detail_message(answer["detail"])
    else:
        message = body.decode("utf-8", "replace").strip()
    cause = "engine_error" if status >= 500 else "client_error"
    return APIError(status, message or f"The engine answered HTTP {status}.", param=param, code=code, cause=cause)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _detail_message(detail: object) -> str:
    """FastAPI's `detail`: a sentence, or a list of validation errors with `loc` and `msg`."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and all(isinstance(item, dict) for item in detail):
        return "; ".join(
            f"{'.'.join(map(str, item.get('loc') or ()))}: {item.get('msg', '')}".lstrip(": ") for item in detail
        )
    return json.dumps(detail)
