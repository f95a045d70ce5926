"""API key checks for inference and operator routes.

`API_KEY` may hold several comma-separated keys so they can be rotated
without downtime. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from app.errors import APIError


class KeyCheck:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, authorization: bytes | None) -> None:
        """Raise 401 unless `authorization` is `Bearer <one of the keys>`."""
        if not self._keys:
            return
        if not authorization or not authorization[:7].lower() == b"bearer ":
            raise APIError(401, "Missing API key: send `Authorization: Bearer <API_KEY>`.", code="missing_api_key", cause="auth")
        presented = authorization[7:].strip()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise APIError(401, "Invalid API key.", code="invalid_api_key", cause="auth")


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in scope_headers:
        if key == name:
            return value
    return None
