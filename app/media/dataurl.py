"""Base64 `data:` URLs: parsed the way the engine parses them, built for it.

The engine reads `data:[<media type>][;<param>]*;base64,<payload>` (RFC 2397,
base64 only, strict alphabet). Parsing with the same rules here means a data
URL the wrapper accepts is one the engine accepts, and the size of the
payload is known from its length before a single byte is decoded.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from app.errors import APIError


@dataclass(frozen=True, slots=True)
class DataUrl:
    media_type: str
    payload: str

    @classmethod
    def encode(cls, media_type: str, data: bytes) -> DataUrl:
        return cls(media_type, base64.b64encode(data).decode("ascii"))

    @property
    def url(self) -> str:
        return f"data:{self.media_type};base64,{self.payload}"

    @property
    def decoded_size(self) -> int:
        """Bytes the payload decodes to, computed from its length alone."""
        padding = 2 if self.payload.endswith("==") else 1 if self.payload.endswith("=") else 0
        return len(self.payload) * 3 // 4 - padding


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def parse_data_url(url: str) -> DataUrl:
    comma = url.find(",", 5)  # find + one slice: the payload may be megabytes long
    if comma < 0:
        raise APIError(400, "The data: URL has no ',' before its payload; send data:<media type>;base64,<data>.")
    media_type, semicolon, encoding = url[5:comma].rpartition(";")
    if not semicolon or encoding != "base64":
        raise APIError(400, "Only base64 data: URLs are accepted; send data:<media type>;base64,<data>.")
    return DataUrl(media_type=media_type.partition(";")[0].lower(), payload=url[comma + 1 :])


def decode_base64(payload: str) -> bytes:
    """Strict base64 decoding, as the engine does it (no whitespace, no stray characters)."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "The data: URL payload is not valid base64.") from None
