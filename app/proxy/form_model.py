"""The `model` field of a multipart upload (the audio routes), read from the already-buffered body.

With MODELS, a transcription or translation goes to the engine of the model its
form names, like a JSON body's `model`. The body is relayed as it is, so only
that one field is collected here: python-multipart (the parser Starlette uses)
walks the parts through callbacks, and the file parts' bytes are skipped, never
copied or spooled to disk.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import APIError

MODEL_FIELD = "model"
MAX_MODEL_BYTES = 1024  # a served name; anything longer is not one


def form_model(body: bytes, content_type: bytes) -> str | None:
    """The value of the form's `model` field (None when the form has none); 400 for a body that is not multipart."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise APIError(400, "The multipart/form-data content type has no boundary; let the HTTP client set it.",
                       code="invalid_content_type")
    reader = _ModelField()
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise APIError(400, "The multipart/form-data body is malformed; send the form as the HTTP client encodes it.",
                       code="invalid_multipart") from None
    return reader.value


class _ModelField:
    """Collects the first `model` part's text as the parser reports it."""

    def __init__(self) -> None:
        self.value: str | None = None
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self._collecting = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._collecting = b"", False
        self._data.clear()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"").decode("latin-1")
        self._collecting = self.value is None and name == MODEL_FIELD and b"filename" not in params

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._collecting:
            self._data += data[start:end]
            if len(self._data) > MAX_MODEL_BYTES:
                raise APIError(400, "The form's `model` field is too long to be a model name.", param="model",
                               code="invalid_value")

    def _part_end(self) -> None:
        if self._collecting:
            self.value = self._data.decode("utf-8", errors="replace").strip()
            self._collecting = False
