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

    def verify(self, authorization: bytes | None) -> str | None:
        """The key in `authorization` (`Bearer <key>`), or 401; None when no keys are configured."""
        if not self._keys:
            return None
        if not authorization or not authorization[:7].lower() == b"bearer ":
            raise APIError(401, "Missing API key: send `Authorization: Bearer <API_KEY>`.", code="missing_api_key", cause="auth")
        presented = authorization[7:].strip()
        matched: bytes | None = None
        for key in self._keys:
            if hmac.compare_digest(presented, key):
                matched = key
        if matched is None:
            raise APIError(401, "Invalid API key.", code="invalid_api_key", cause="auth")
        return matched.decode()


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in scope_headers:
        if key == name:
            return value
    return None
