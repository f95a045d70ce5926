"""Container log lines: JSON by default, text on request, secrets redacted, one summary per request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import uvicorn

from app.observability.logging import (
    REDACTED,
    LineHandler,
    build_formatter,
    configure_logging,
    install_secret_redaction,
    log_engine_line,
    uvicorn_log_config,
)
from app.observability.record import RequestRecord
from app.observability.request_log import ACCESS_LOGGER, log_request

SUMMARY_FIELDS = {
    "timestamp", "level", "logger", "message",
    "request_id", "method", "path", "status", "model", "stream", "duration_ms", "ttft_ms",
    "prompt_tokens", "completion_tokens", "tokens_per_s", "modalities", "client", "queue_wait_ms",
}
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
API_KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def output(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[str]]]:
    """Lines written to stdout since the last call; logging is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def lines() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if line]

    yield lines
    install_secret_redaction([])
    logging.captureWarnings(False)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def finished_record(**changes: object) -> RequestRecord:
    record = RequestRecord(
        request_id="3f2a9c", method="POST", path="/v1/chat/completions",
        route="/v1/chat/completions", client="203.0.113.7",
    )
    record.status = 200
    record.model = "tiny-llama"
    record.stream = True
    record.first_token_at = record.started + 0.120
    record.finished = record.started + 1.5
    record.prompt_tokens = 42
    record.completion_tokens = 60
    record.text_parts = 2
    record.images = 1
    record.queue_wait_s = 0.004
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_summary_line_has_every_field(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    record = finished_record()

    log_request(record)

    lines = output()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert set(line) == SUMMARY_FIELDS
    assert line["logger"] == ACCESS_LOGGER and line["message"] == "request" and line["level"] == "INFO"
    assert (line["request_id"], line["method"], line["path"], line["status"]) == (
        record.request_id, record.method, record.path, record.status
    )
    assert (line["model"], line["stream"], line["client"]) == (record.model, record.stream, record.client)
    assert line["duration_ms"] == pytest.approx(record.duration_s * 1000, abs=0.1)
    assert line["ttft_ms"] == pytest.approx(record.ttft_s * 1000, abs=0.1)
    assert line["queue_wait_ms"] == pytest.approx(record.queue_wait_s * 1000, abs=0.1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (record.prompt_tokens, record.completion_tokens)
    assert line["tokens_per_s"] == pytest.approx(record.completion_tokens / record.duration_s, abs=0.01)
    assert line["modalities"] == {"text": record.text_parts, "image": record.images, "video": record.videos}
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


def test_failed_request_names_the_cause(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")

    log_request(finished_record(status=504, error_cause="timeout", completion_tokens=None, first_token_at=None))

    (line,) = map(json.loads, output())
    assert line["error"] == "timeout"
    assert line["level"] == "WARNING"
    assert line["tokens_per_s"] is None and line["ttft_ms"] is None


def test_probes_are_summarised_only_at_debug(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    log_request(finished_record(path="/ping", route="/ping"), probe=True)
    assert output() == []

    configure_logging("json", "DEBUG")
    log_request(finished_record(path="/ping", route="/ping"), probe=True)
    assert [json.loads(line)["path"] for line in output()] == ["/ping"]


def test_text_format_is_readable_and_not_json(output: Callable[[], list[str]]) -> None:
    configure_logging("text", "INFO")

    log_request(finished_record())

    (line,) = output()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "INFO app.access: request" in line
    assert "status=200" in line and "model=tiny-llama" in line


def test_level_filters_lines(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "WARNING")

    logging.getLogger("app.test").info("hidden")
    logging.getLogger("app.test").warning("shown")

    assert [json.loads(line)["message"] for line in output()] == ["shown"]


def test_configuring_twice_does_not_duplicate_lines(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    configure_logging("json", "INFO")

    logging.getLogger("app.test").info("once")

    assert len(output()) == 1


def test_every_source_writes_json(output: Callable[[], list[str]]) -> None:
    # uvicorn applies its log config when the Config is built.
    uvicorn.Config(
        app="app.main:app", log_config=uvicorn_log_config("json", "INFO"), access_log=False, use_colors=False
    )
    logging.captureWarnings(True)

    logging.getLogger("uvicorn.error").info("Started server process [%d]", 123)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/ping", "1.1", 200)
    logging.getLogger("aiohttp.client").warning("connection reset")
    log_engine_line("(APIServer pid=10114) INFO 11-26 01:06:38 [model.py:2152] Using max model len 512")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    log_request(finished_record())

    lines = [json.loads(line) for line in output()]
    loggers = [line["logger"] for line in lines]
    assert loggers == ["uvicorn.error", "aiohttp.client", "engine", "py.warnings", ACCESS_LOGGER]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys()
        assert "color_message" not in line


def test_uvicorn_access_lines_are_left_to_the_summary_line(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "DEBUG")

    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/ping", "1.1", 200)

    assert output() == []


@pytest.mark.parametrize(
    ("raw", "level", "message"),
    [
        ("(APIServer pid=10114) INFO 11-26 01:06:38 [model.py:2152] Using max model len 512",
         "INFO", "Using max model len 512"),
        ("(EngineCore pid=10221) WARNING 11-26 01:06:45 [cpu.py:224] Triton is not installed.",
         "WARNING", "Triton is not installed."),
        ("(Worker pid=10297) ERROR 11-26 01:07:01 [core.py:12] EngineCore failed to start.",
         "ERROR", "EngineCore failed to start."),
        ("\x1b[32mINFO\x1b[0m 11-26 01:06:38 [loggers.py:335] Engine 000: Avg prompt throughput: 3.8 tokens/s",
         "INFO", "Engine 000: Avg prompt throughput: 3.8 tokens/s"),
        ('INFO:     127.0.0.1:52050 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
         "INFO", '127.0.0.1:52050 - "POST /v1/chat/completions HTTP/1.1" 200 OK'),
        ("Loading safetensors checkpoint shards: 100% Completed | 1/1", "INFO",
         "Loading safetensors checkpoint shards: 100% Completed | 1/1"),
    ],
)
def test_engine_lines_keep_the_engine_level(
    output: Callable[[], list[str]], raw: str, level: str, message: str
) -> None:
    configure_logging("json", "INFO")

    log_engine_line(raw + "\n")

    (line,) = map(json.loads, output())
    assert (line["logger"], line["level"], line["message"]) == ("engine", level, message)


def test_engine_line_details_are_fields(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")

    log_engine_line("(EngineCore pid=10221) WARNING 11-26 01:06:45 [cpu.py:224] Triton is not installed.", "stdout")
    log_engine_line("Traceback (most recent call last):", "stderr")
    log_engine_line("   \n", "stdout")

    first, second = map(json.loads, output())
    assert first["engine_process"] == "EngineCore pid=10221"
    assert (first["engine_source"], first["stream"]) == ("cpu.py:224", "stdout")
    assert (second["level"], second["stream"]) == ("WARNING", "stderr")


def test_secrets_are_redacted_everywhere(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    install_secret_redaction([HF_TOKEN, API_KEY, ""])
    log = logging.getLogger("app.test")

    log.info("token is %s", HF_TOKEN)
    log.warning("request failed", extra={"headers": {"authorization": f"Bearer {API_KEY}"}, "keys": [API_KEY]})
    try:
        raise RuntimeError(f"401 for token {HF_TOKEN}")
    except RuntimeError:
        log.exception("download failed")
    log_engine_line(f"(APIServer pid=1) INFO 11-26 01:06:38 [x.py:1] env HF_TOKEN={HF_TOKEN}")

    text = "\n".join(output())
    assert HF_TOKEN not in text and API_KEY not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["message"] == f"token is {REDACTED}"
    assert lines[1]["headers"] == {"authorization": f"Bearer {REDACTED}"} and lines[1]["keys"] == [REDACTED]
    assert f"401 for token {REDACTED}" in lines[2]["exc_info"]
    assert lines[3]["message"] == f"env HF_TOKEN={REDACTED}"


def test_secrets_are_redacted_in_text_format(output: Callable[[], list[str]]) -> None:
    install_secret_redaction([API_KEY])
    configure_logging("text", "INFO")

    logging.getLogger("app.test").info("key %s", API_KEY, extra={"key": API_KEY})

    (line,) = output()
    assert API_KEY not in line and line.count(REDACTED) == 2


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


async def test_lines_of_one_loop_iteration_are_written_together_and_in_order() -> None:
    stream = Writes()
    handler = LineHandler(stream)
    handler.setFormatter(build_formatter("json"))
    logger = logging.getLogger("app.test.batch")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("one")
        logger.warning("two")
        assert stream.calls == []  # waiting for the end of this iteration
        await asyncio.sleep(0)
        await asyncio.to_thread(logger.warning, "from a thread")  # no loop there: written at once
        logger.warning("three")
        handler.flush()  # as logging.shutdown() does at exit
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert [[json.loads(line)["message"] for line in call.splitlines()] for call in stream.calls] == [
        ["one", "two"], ["from a thread"], ["three"],
    ]


def test_json_lines_take_any_extra_value(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    when = datetime(2026, 1, 2, 3, 4, 5)

    logging.getLogger("app.test").info("odd values", extra={"when": when, "path": Path("/x"), "text": "é \ud800"})

    (line,) = map(json.loads, output())
    # A lone surrogate cannot be written as UTF-8: the line carries its escape, and reads back as it was.
    assert (line["when"], line["path"], line["text"]) == ("2026-01-02T03:04:05", "/x", "é \ud800")


def test_a_client_string_cannot_break_or_forge_a_json_line(output: Callable[[], list[str]]) -> None:
    """Line breaks of any kind in a client's string stay inside that line's JSON string."""
    configure_logging("json", "INFO")
    forged = 'x"}\n{"level": "CRITICAL"}\r\u2028\u2029\x85\x0b\x1c'

    log_request(finished_record(model=forged, path="/v1/" + forged))

    (line,) = map(json.loads, output())  # read with str.splitlines, which splits on every Unicode line break
    assert (line["model"], line["path"], line["level"]) == (forged, "/v1/" + forged, "INFO")


def test_a_client_string_cannot_break_a_text_line(output: Callable[[], list[str]]) -> None:
    configure_logging("text", "INFO")

    log_request(finished_record(model="m\nFAKE ERROR line\u2028"))

    (line,) = output()
    assert "model='m\\nFAKE ERROR line\\u2028'" in line


def test_summary_line_is_redacted_and_reaches_added_handlers(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    install_secret_redaction([API_KEY])

    log_request(finished_record(path=f"/v1/chat/completions/{API_KEY}"))
    collected: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = collected.append  # type: ignore[method-assign]
    logging.getLogger(ACCESS_LOGGER).addHandler(extra)
    try:
        log_request(finished_record(status=201))
    finally:
        logging.getLogger(ACCESS_LOGGER).removeHandler(extra)

    first, second = map(json.loads, output())
    assert API_KEY not in json.dumps(first) and first["path"] == f"/v1/chat/completions/{REDACTED}"
    assert set(first) == set(second) == SUMMARY_FIELDS
    assert [record.status for record in collected] == [201]  # type: ignore[attr-defined]


def test_a_line_left_when_a_loop_closed_goes_out_with_the_next_loop() -> None:
    stream = Writes()
    handler = LineHandler(stream)
    handler.setFormatter(build_formatter("json"))
    logger = logging.getLogger("app.test.loops")
    logger.addHandler(handler)
    logger.propagate = False

    async def log(message: str) -> None:
        logger.warning(message)

    def log_and_stop() -> None:
        logger.warning("first")
        loop.stop()  # the loop ends with this iteration, before the one that would write "first"

    try:
        loop = asyncio.new_event_loop()
        loop.call_soon(log_and_stop)
        loop.run_forever()
        loop.close()
        assert stream.calls == []
        asyncio.run(log("second"))
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert [json.loads(line)["message"] for call in stream.calls for line in call.splitlines()] == ["first", "second"]


def test_a_request_that_waited_for_its_model_says_how_long(output: Callable[[], list[str]]) -> None:
    configure_logging("json", "INFO")
    log_request(finished_record(load_wait_s=42.5))
    log_request(finished_record())

    waited, single_model = (json.loads(line) for line in output())
    assert waited["load_wait_ms"] == 42500.0
    assert "load_wait_ms" not in single_model  # only with MODELS


def test_odd_keys_and_big_integers_are_written_as_json_would(output: Callable[[], list[str]]) -> None:
    """Keys that are not strings become strings, integers of any size stay exact."""
    configure_logging("json", "INFO")

    logging.getLogger("app.test").info("odd keys", extra={"counts": {1: "one"}, "big": 2**70})

    (line,) = map(json.loads, output())
    assert (line["message"], line["counts"], line["big"]) == ("odd keys", {"1": "one"}, 2**70)
