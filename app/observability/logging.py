"""Every line the container writes: one JSON object per line (or text with LOG_FORMAT=text).

Log collectors (RunPod, Docker, Loki, CloudWatch) index JSON lines without
parsing rules, so the wrapper's own logs, uvicorn's, and the engine's output
(forwarded line by line by the supervisor) all go through one handler with one
formatter. Every JSON line has `timestamp` (ISO 8601, UTC), `level`, `logger`
and `message`, plus the record's extra fields.

Secrets are never passed to a logger; as a second line of defence a filter on
that handler replaces the values of known secrets (HF_TOKEN, API keys) in
messages, arguments, extra fields and tracebacks.

The wrapper writes one line per request, so a line must be cheap: the JSON
formatter is a dict and one msgspec `encode` (a second's timestamp prefix is
formatted once), records skip the caller lookup (no line shows it), and the
handler writes the lines of one event-loop iteration in one `write` at its
end rather than one `write` each. `log_fields`, for the per-request line,
skips the LogRecord when that handler is the line's only way out.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import logging.config
import re
import threading
import time
from collections.abc import Iterable
from itertools import islice
from typing import Any, TextIO

import msgspec

REDACTED = "[REDACTED]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENGINE_LOGGER = "engine"

# Attributes every LogRecord has; anything else on a record is an extra field.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn attaches an ANSI-coloured copy of some messages; it is noise in a log store.
_SKIPPED_EXTRAS = _STANDARD_ATTRS | {"color_message", "taskName"}
# A record's own attributes come first in its __dict__, its extra fields after them.
_OWN_ATTRS = len(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)


# Characters that JSON leaves as they are but Unicode-aware line readers
# (Python's str.splitlines, JavaScript) take for line breaks.
_LINE_BREAKS_IN_STRINGS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _writable(line: str) -> str:
    """`line` with lone surrogates escaped as \\ud800, so that it can be written as UTF-8.

    Clients can send them as JSON escapes (in the model name, say); unescaped,
    the handler would drop the line and print a traceback instead.
    """
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_json_line(line: str) -> str:
    """A JSON line that every line reader reads as one line and that can be written as UTF-8.

    A client's string (a path, a model name) may hold U+2028 or U+0085: left
    raw, a reader that splits on Unicode line breaks would cut the line there.
    In a JSON string their `\\u` escapes read back as the same characters.
    """
    return _writable(line.translate(_LINE_BREAKS_IN_STRINGS))


class TextFormatter(logging.Formatter):
    """Plain lines for reading in a terminal, extra fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{key}={_text_value(value)}" for key, value in record.__dict__.items() if key not in _SKIPPED_EXTRAS
        )
        return _writable(f"{line} {extras}" if extras else line)


_TEXT_LINE_BREAK = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _text_value(value: object) -> str:
    """An extra field for a text line: quoted with escapes when it holds a line break (a client's path, say)."""
    text = str(value)
    return repr(text) if _TEXT_LINE_BREAK.search(text) else text


def _json_value(value: object) -> object:
    """What json cannot encode by itself: dates as ISO 8601, anything else as its str()."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _dumps(fields: dict[str, Any]) -> str:
    """The line's JSON: msgspec (0.8 µs for a request line, `json` 3.9 µs), `json` for what msgspec refuses.

    msgspec refuses a lone surrogate (`json` writes its escape); it writes NaN
    and Infinity as null, where `json` would write tokens that are not JSON.
    """
    try:
        return msgspec.json.encode(fields, enc_hook=_json_value).decode()
    except (TypeError, ValueError):  # UnicodeEncodeError: a lone surrogate
        return json.dumps(fields, ensure_ascii=False, default=_json_value)


class JsonLineFormatter(logging.Formatter):
    """`timestamp` (ISO 8601, UTC), `level`, `logger`, `message`, then the record's extra fields, in one line."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1e6):06d}+00:00"

    def format_fields(self, fields: dict[str, Any]) -> str:
        line = _dumps(fields)
        return line if line.isascii() else _one_json_line(line)

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "timestamp": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in islice(record.__dict__.items(), _OWN_ATTRS, None):
            if key not in _SKIPPED_EXTRAS:
                fields[key] = value
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc_info"] = record.exc_text
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        return self.format_fields(fields)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop iteration together, at its end.

    Outside an event loop (another thread, before or after the loop) a line is
    written at once, after any that wait, so lines keep their order.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's rule: a handler reports its errors, never raises them
            self.handleError(record)
            return
        self.write_line(line)

    def write_line(self, line: str) -> None:
        """Queue one formatted line (with its terminator); the caller holds the lock, as `emit`'s does."""
        loop = self._loop
        if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():
            # Another thread, or no loop known yet: ask (Python 3.11 makes a getpid syscall for it).
            loop = asyncio._get_running_loop()
            if loop is not None:
                self._loop, self._loop_thread = loop, threading.get_ident()
        if loop is None:
            self._pending.append(line)
            self.flush()
            return
        self._pending.append(line)
        if self._flush_on is not loop:  # not yet scheduled on this loop (or on one that has since closed)
            self._flush_on = loop
            loop.call_soon(self._flush_from_loop)

    def _flush_from_loop(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                text, self._pending = "".join(self._pending), []
                try:
                    self.stream.write(text)
                except Exception:  # noqa: BLE001 - a closed or broken stream: a handler never raises
                    return
            super().flush()


def log_fields(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """`logger.log(level, message, extra=fields)`, without a LogRecord when it can do without.

    That is when the line's only way out is one `LineHandler` with the JSON
    format on the root logger, the configuration `configure_logging` makes,
    and no logger on the way filters: the line is formatted straight from
    `fields`, redacted like any other. Anything else (text format, a handler
    added by a test or a library) gets the record.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _sole_json_handler(logger, level)
    if handler is None:
        logger.log(level, message, extra=fields)
        return
    line: dict[str, Any] = {
        "timestamp": handler.formatter.timestamp(time.time()),  # type: ignore[union-attr]
        "level": logging.getLevelName(level),
        "logger": logger.name,
        "message": message,
    }
    line.update(fields)
    if _SECRET_FILTER.active:
        line = _SECRET_FILTER._redact_value(line)
    try:
        text = handler.formatter.format_fields(line) + handler.terminator  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - the record's path reports the error as logging does
        logger.log(level, message, extra=fields)
        return
    with handler.lock:  # type: ignore[union-attr]
        handler.write_line(text)


def _sole_json_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.parent is None or not current.propagate:
            break
        if current.handlers:
            return None
        current = current.parent
    if current is None or current.parent is not None or len(current.handlers) != 1:
        return None
    handler = current.handlers[0]
    if (
        type(handler) is not LineHandler
        or type(handler.formatter) is not JsonLineFormatter
        or level < handler.level
        or any(f is not _SECRET_FILTER for f in handler.filters)
    ):
        return None
    return handler


def build_formatter(log_format: str, use_colors: bool | None = None) -> logging.Formatter:
    """The formatter for LOG_FORMAT; a dictConfig factory.

    `use_colors` is accepted because uvicorn writes it into the "default" and
    "access" formatters of a log config when it is given `use_colors`; neither
    format uses colours.
    """
    if log_format == "text":
        return TextFormatter(TEXT_FORMAT)
    if log_format != "json":
        raise ValueError(f"LOG_FORMAT={log_format!r} is not supported; use json or text")
    return JsonLineFormatter()


class SecretRedactionFilter(logging.Filter):
    """Replaces the values of known secrets in a record before any formatter sees it."""

    def __init__(self) -> None:
        super().__init__()
        self._pattern: re.Pattern[str] | None = None

    def set_secrets(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # Arguments that do not fit the format: keep both, redacted.
            message = f"{record.msg} {record.args!r}"
        record.msg = self.redact(message)
        record.args = ()
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                record.__dict__[key] = self._redact_value(value)
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self._redact_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._redact_value(item) for item in value)
        return value


# One filter for the whole process, so secrets installed before or after
# logging is (re)configured are redacted on whichever handler is current.
_SECRET_FILTER = SecretRedactionFilter()


def secret_redaction_filter() -> SecretRedactionFilter:
    """The process's redaction filter; a dictConfig factory."""
    return _SECRET_FILTER


def install_secret_redaction(secrets: Iterable[str]) -> None:
    """Redact these values from every log line of this process (replaces the previous set)."""
    _SECRET_FILTER.set_secrets(secrets)


def uvicorn_log_config(log_format: str, level: str) -> dict[str, Any]:
    """A logging dictConfig for `uvicorn.Config(log_config=...)`: everything to stdout in LOG_FORMAT.

    uvicorn's access log is silenced: the wrapper writes its own summary line
    per request (logger `app.access`). Pass `access_log=False` to uvicorn too,
    which skips building those records at all.
    """
    formatter = {"()": f"{__name__}.build_formatter", "log_format": log_format}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # uvicorn expects these two names when it is given use_colors.
        "formatters": {"default": formatter, "access": dict(formatter)},
        "filters": {"redact_secrets": {"()": f"{__name__}.secret_redaction_filter"}},
        "handlers": {
            "stdout": {
                "class": f"{__name__}.LineHandler",
                "stream": "ext://sys.stdout",
                "formatter": "default",
                "filters": ["redact_secrets"],
            }
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True, "level": level.upper()},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": level.upper()},
            "uvicorn.access": {"handlers": [], "propagate": True, "level": "WARNING"},
        },
    }


def configure_logging(log_format: str, level: str) -> None:
    """Send every logger of this process to stdout in LOG_FORMAT at LOG_LEVEL; safe to call again."""
    logging.config.dictConfig(uvicorn_log_config(log_format, level))
    # No line shows the process, thread or multiprocessing name, nor the caller's file and
    # line: skip the lookups (a getpid syscall, a walk up the stack) every LogRecord would make.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None  # the documented switch for the caller lookup
    # Python warnings become log records too, instead of raw text on stderr.
    logging.captureWarnings(True)


# --- Engine output -----------------------------------------------------------------

# vLLM: "(APIServer pid=10114) INFO 11-26 01:06:29 [api_utils.py:347] message"
_VLLM_LINE = re.compile(
    r"^(?:\((?P<process>[^)]*)\)\s+)?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
    r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[(?P<source>[^\]]*)\]\s?(?P<message>.*)$"
)
# uvicorn inside the engine: "INFO:     127.0.0.1:52050 - "POST /v1/completions HTTP/1.1" 200 OK"
_UVICORN_LINE = re.compile(
    r"^(?:\((?P<process>[^)]*)\)\s+)?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(?P<message>.*)$"
)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_engine_logger = logging.getLogger(ENGINE_LOGGER)


def log_engine_line(line: str, stream: str | None = None) -> None:
    """Log one line of the engine's output as a record of logger "engine".

    The engine's own level is kept when the line carries one. Other lines
    (warnings, tracebacks, progress bars) get INFO, or WARNING when `stream`
    says they came from stderr; `stream` is added to the record when given.
    """
    text = _ANSI_ESCAPE.sub("", line.rstrip("\r\n"))
    if not text.strip():
        return
    extra: dict[str, str] = {} if stream is None else {"stream": stream}
    match = _VLLM_LINE.match(text) or _UVICORN_LINE.match(text)
    if match is None:
        level = logging.WARNING if stream == "stderr" else logging.INFO
        message = text
    else:
        level = logging.getLevelName(match["level"])
        message = match["message"]
        if match["process"]:
            extra["engine_process"] = match["process"]
        if match.re is _VLLM_LINE:
            extra["engine_source"] = match["source"]
    _engine_logger.log(level, message, extra=extra)
