"""What the load and resilience tests send to the stack, and how they read the answers."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import TEXT_MODEL

CHAT_PATH = "/v1/chat/completions"
SSE_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def chat_body(max_tokens: int, stream: bool, usage: bool = False) -> dict[str, object]:
    """A chat request for exactly `max_tokens` tokens; `usage` asks a stream for its usage chunk."""
    body: dict[str, object] = {
        "model": TEXT_MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_data(raw: bytes) -> list[str]:
    """The `data:` fields of a server-sent event stream, in order.

    Lines end at CR or LF only: the JSON of a chunk may hold U+2028 or U+0085,
    which `str.splitlines` would also split on.
    """
    lines = SSE_LINE_BREAK.split(raw.decode(errors="replace"))
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def metric_samples(exposition: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition by name (meant for unlabelled series)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
