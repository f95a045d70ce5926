"""OpenAI-shaped errors.

Every error the wrapper produces itself uses the body OpenAI clients parse:
``{"error": {"message", "type", "param", "code"}}``. The `cause` attribute is
not sent; it labels the error in metrics and in the request log line
(client_error, engine_error, timeout, rejected, auth, unavailable).
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
