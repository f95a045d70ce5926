#!/usr/bin/env python3
"""Check a running deployment end to end, the way a client would see it.

    python test_api.py http://localhost:8000 [--api-key KEY] [--json report.json]

Runs every check, prints one row per check and exits 1 if any failed:
health, info, models, text, streaming, tool calling, structured output, the
Responses and Messages APIs, image by URL, image as base64, video,
embeddings, rerank, transcription, error shapes and metrics. What the
deployment does not serve is skipped, and each skip says why: the modalities
come from /info `modalities`, the endpoints from /info `capabilities` (a
deployment that does not report them is taken for a chat model without a
tool-call parser).

The test media are made in memory: a PNG with Pillow and, when PyAV is
installed, a short H.264 MP4. "Image by URL" serves the PNG from a tiny HTTP
server this script starts on 127.0.0.1; when the deployment runs elsewhere,
pass --media-host with an address of this machine that the deployment can
reach. The wrapper refuses private addresses unless the deployment sets
ALLOW_PRIVATE_MEDIA_URLS=true; that refusal is reported as a skip.

Needs: httpx and pillow (and av for the video check).
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import math
import struct
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from PIL import Image

PASS, FAIL, SKIP = "pass", "fail", "skip"
ERROR_FIELDS = {"message", "type", "param", "code"}
# What a deployment that does not report /info `capabilities` is taken to serve.
CHAT_MODEL = {
    "generation": True,
    "tool_calling": None,
    "endpoints": ["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# A scalar at the top: any model, even a random one, finishes it within a few tokens (between an
# object's fields JSON allows whitespace, which a weak model can repeat until max_tokens).
VERDICT_SCHEMA = {"type": "string", "enum": ["yes", "no"]}


@dataclass
class Result:
    check: str
    status: str
    detail: str
    seconds: float


class CheckFailed(Exception):
    """The deployment answered, but not as it should."""


class Skipped(Exception):
    """The check does not apply to this deployment; the message says why."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def sample_png(size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new("RGB", size)
    image.putdata([(x * 4 % 256, y * 4 % 256, 128) for y in range(size[1]) for x in range(size[0])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_mp4(frames: int = 4, size: tuple[int, int] = (64, 64)) -> bytes:
    """A short H.264 MP4; Skipped when PyAV is not installed."""
    try:
        import av
    except ImportError:
        raise Skipped("PyAV (pip install av) is not installed to make a test video") from None
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(4))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (index * 60 % 256, 90, 160)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


@contextmanager
def media_server(bind: str, port: int, files: dict[str, tuple[bytes, str]]) -> Iterator[int]:
    """Serve `files` (path -> body, content type) over HTTP; yields the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = files.get(self.path, (b"", ""))
            self.send_response(200 if content_type else 404)
            self.send_header("Content-Type", content_type or "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((bind, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def error_shape_problem(response: httpx.Response) -> str | None:
    """None when the body is an OpenAI error object, else what is wrong with it."""
    try:
        body = response.json()
    except ValueError:
        return f"body is not JSON: {response.text[:120]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"no 'error' object in {json.dumps(body)[:160]}"
    missing = ERROR_FIELDS - set(error)
    if missing:
        return f"'error' lacks {sorted(missing)}: {json.dumps(error)[:160]}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "'error.message' is empty"
    return None


def sample_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A 440 Hz tone as 16-bit mono WAV."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(int(seconds * rate))
            )
        )
    return buffer.getvalue()


def parse_sse(lines: Iterator[str]) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of an SSE stream, and whether it ended with `data: [DONE]`."""
    events: list[dict[str, Any]] = []
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators and `: keep-alive` comments
        data = line[5:].strip()
        if data == "[DONE]":
            return events, True
        try:
            events.append(json.loads(data))
        except ValueError:
            raise CheckFailed(f"stream event is not JSON: {data[:120]!r}") from None
    return events, False


class ApiChecks:
    """The checks, in order; each returns a detail string or raises CheckFailed/Skipped."""

    def __init__(
        self, base_url: str, api_key: str | None, model: str | None, media_host: str, media_port: int, timeout_s: float
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.api_key = api_key
        self.model = model
        self.media_host = media_host
        self.media_port = media_port
        self.info: dict[str, Any] | None = None

    def all(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("health", self.health),
            ("info", self.read_info),
            ("models", self.models),
            ("text", self.text),
            ("streaming", self.streaming),
            ("tool calling", self.tool_calling),
            ("structured output", self.structured_output),
            ("responses API", self.responses_api),
            ("messages API", self.messages_api),
            ("image by URL", self.image_by_url),
            ("image as base64", self.image_base64),
            ("video", self.video),
            ("embeddings", self.embeddings),
            ("rerank", self.rerank),
            ("transcription", self.transcription),
            ("error shapes", self.error_shapes),
            ("metrics", self.metrics),
        ]

    # --- checks ---------------------------------------------------------------

    def health(self) -> str:
        ping = self.http.get("/ping")
        require(ping.status_code == 200, f"/ping answered {ping.status_code}, expected 200 (ready)")
        health = self.http.get("/health")
        require(health.status_code == 200, f"/health answered {health.status_code}: {health.text[:200]}")
        phase = health.json().get("phase")
        require(phase == "ready", f"/health phase is {phase!r}, expected 'ready'")
        return "ready"

    def read_info(self) -> str:
        response = self.http.get("/info")
        require(response.status_code == 200, f"/info answered {response.status_code}: {response.text[:200]}")
        info = response.json()
        for key in ("model", "served_model_name", "max_model_len", "modalities"):
            require(key in info, f"/info lacks '{key}'")
        require(isinstance(info["modalities"], list), "/info 'modalities' is not a list")
        self.info = info
        self.model = self.model or info["served_model_name"]
        capabilities = info.get("capabilities") or {}
        kinds = [kind for kind in ("generation", "embedding", "scoring", "transcription") if capabilities.get(kind)]
        served = f", serves {'+'.join(kinds)}" if kinds else ""
        return (
            f"{info['served_model_name']}, {'+'.join(info['modalities'])}, max_model_len {info['max_model_len']}{served}"
        )

    def models(self) -> str:
        response = self.http.get("/v1/models")
        require(response.status_code == 200, f"/v1/models answered {response.status_code}: {response.text[:200]}")
        ids = [entry["id"] for entry in response.json().get("data", [])]
        require(bool(ids), "/v1/models lists no model")
        if self.model is None:
            self.model = ids[0]
        require(self.model in ids, f"{self.model!r} not among {ids}")
        return ", ".join(ids)

    def text(self) -> str:
        self._require_endpoint("/v1/chat/completions", "chat")
        body = self._chat([{"role": "user", "content": "Say hello."}])
        choice = body["choices"][0]
        require(choice["message"]["role"] == "assistant", f"role is {choice['message']['role']!r}")
        require(isinstance(choice["message"]["content"], str), "message content is not text")
        require(choice["finish_reason"] in {"stop", "length"}, f"finish_reason {choice['finish_reason']!r}")
        require(body["usage"]["completion_tokens"] > 0, "usage reports no completion tokens")
        return f"{body['usage']['completion_tokens']} tokens, finish_reason {choice['finish_reason']}"

    def streaming(self) -> str:
        self._require_endpoint("/v1/chat/completions", "chat")
        request = self._request([{"role": "user", "content": "Count to ten."}], stream=True)
        with self.http.stream("POST", "/v1/chat/completions", json=request) as response:
            if response.status_code != 200:
                response.read()
                raise CheckFailed(f"answered {response.status_code}: {response.text[:200]}")
            content_type = response.headers.get("content-type", "")
            require(content_type.startswith("text/event-stream"), f"content-type is {content_type!r}")
            events, done = parse_sse(response.iter_lines())
        require(done, "the stream did not end with 'data: [DONE]'")
        choices = [choice for event in events for choice in event.get("choices", [])]
        pieces = [c["delta"].get("content") for c in choices if c.get("delta", {}).get("content")]
        finishes = [c["finish_reason"] for c in choices if c.get("finish_reason")]
        require(bool(pieces), "no content arrived in the stream")
        require(len(finishes) == 1, f"expected one finish_reason, got {finishes}")
        return f"{len(events)} events, {len(pieces)} with content, then [DONE]"

    def tool_calling(self) -> str:
        self._require_endpoint("/v1/chat/completions", "chat")
        if not self._capabilities().get("tool_calling"):
            raise Skipped("deployment advertises no tool calling (set TOOL_CALL_PARSER)")
        request = {
            **self._request([{"role": "user", "content": "What is the weather in Paris?"}]),
            "max_tokens": 64,
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
        }
        body = self._post_json("/v1/chat/completions", request)
        calls = body["choices"][0]["message"].get("tool_calls") or []
        require(bool(calls), f"no tool call in {json.dumps(body['choices'][0]['message'])[:200]}")
        call = calls[0]["function"]
        require(call["name"] == "get_weather", f"called {call['name']!r}, expected 'get_weather'")
        arguments = json.loads(call["arguments"])
        require(isinstance(arguments, dict) and isinstance(arguments.get("city"), str), f"arguments {arguments!r}")
        return f"get_weather({call['arguments']})"

    def structured_output(self) -> str:
        self._require_endpoint("/v1/chat/completions", "chat")
        request = {
            **self._request([{"role": "user", "content": "Is water wet? Answer yes or no."}]),
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}},
        }
        content = self._post_json("/v1/chat/completions", request)["choices"][0]["message"]["content"]
        try:
            reply = json.loads(content)
        except (TypeError, ValueError):
            raise CheckFailed(f"the reply is not JSON: {str(content)[:120]!r}") from None
        require(reply in VERDICT_SCHEMA["enum"], f"{reply!r} does not match the schema {VERDICT_SCHEMA}")
        return f"JSON matching the schema: {content.strip()}"

    def responses_api(self) -> str:
        self._require_endpoint("/v1/responses", "the Responses API")
        body = self._post_json(
            "/v1/responses", {"model": self.model, "input": "Say hello.", "max_output_tokens": 16, "temperature": 0}
        )
        texts = [
            part.get("text") for item in body.get("output", []) if item.get("type") == "message"
            for part in item.get("content", []) if part.get("type") == "output_text"
        ]
        require(bool(texts), f"no output_text in {json.dumps(body)[:200]}")
        return f"{body['usage']['output_tokens']} output tokens, status {body.get('status')}"

    def messages_api(self) -> str:
        self._require_endpoint("/v1/messages", "the Anthropic Messages API")
        body = self._post_json(
            "/v1/messages",
            {"model": self.model, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]},
        )
        require(body.get("type") == "message", f"type is {body.get('type')!r}, expected 'message'")
        require(any(block.get("type") == "text" for block in body.get("content", [])), "no text block")
        return f"{body['usage']['output_tokens']} output tokens, stop_reason {body.get('stop_reason')}"

    def image_by_url(self) -> str:
        self._require_modality("image")
        png = sample_png()
        bind = self.media_host if _is_ip(self.media_host) else "0.0.0.0"
        with media_server(bind, self.media_port, {"/check.png": (png, "image/png")}) as port:
            url = f"http://{_url_host(self.media_host)}:{port}/check.png"
            response = self._post_chat(self._media_message({"type": "image_url", "image_url": {"url": url}}))
        if response.status_code == 400 and "ALLOW_PRIVATE_MEDIA_URLS" in response.text:
            raise Skipped(
                "deployment refuses private media URLs (ALLOW_PRIVATE_MEDIA_URLS=false); "
                "use --media-host with a public address"
            )
        return self._media_reply(response, f"PNG fetched from {url}")

    def image_base64(self) -> str:
        self._require_modality("image")
        url = "data:image/png;base64," + base64.b64encode(sample_png()).decode("ascii")
        response = self._post_chat(self._media_message({"type": "image_url", "image_url": {"url": url}}))
        return self._media_reply(response, "PNG as data: URL")

    def video(self) -> str:
        self._require_modality("video")
        url = "data:video/mp4;base64," + base64.b64encode(sample_mp4()).decode("ascii")
        response = self._post_chat(self._media_message({"type": "video_url", "video_url": {"url": url}}))
        return self._media_reply(response, "MP4 as data: URL")

    def embeddings(self) -> str:
        self._require_endpoint("/v1/embeddings", "embeddings")
        body = self._post_json("/v1/embeddings", {"model": self.model, "input": ["first text", "second text"]})
        vectors = [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]
        require(len(vectors) == 2, f"{len(vectors)} vectors for 2 inputs")
        require(len(vectors[0]) == len(vectors[1]) > 0, "vectors of different or zero length")
        return f"2 vectors of {len(vectors[0])} dimensions, {body['usage']['prompt_tokens']} tokens"

    def rerank(self) -> str:
        self._require_endpoint("/v1/rerank", "rerank")
        documents = ["Paris is the capital of France.", "The quick brown fox.", "Bananas are yellow."]
        body = self._post_json(
            "/v1/rerank", {"model": self.model, "query": "What is the capital of France?", "documents": documents}
        )
        results = body["results"]
        require(sorted(r["index"] for r in results) == [0, 1, 2], f"indices {[r['index'] for r in results]}")
        scores = [r["relevance_score"] for r in results]
        require(scores == sorted(scores, reverse=True), f"results not ordered by score: {scores}")
        return f"order {[r['index'] for r in results]}"

    def transcription(self) -> str:
        self._require_endpoint("/v1/audio/transcriptions", "speech-to-text")
        response = self.http.post(
            "/v1/audio/transcriptions",
            data={"model": self.model, "language": "en", "response_format": "json"},
            files={"file": ("tone.wav", sample_wav(), "audio/wav")},
        )
        require(response.status_code == 200, f"answered {response.status_code}: {response.text[:200]}")
        text = response.json().get("text")
        require(isinstance(text, str), f"no text in {response.text[:200]}")
        return f"{len(text)} characters for a 1 s tone"

    def error_shapes(self) -> str:
        checked = []
        unknown = self._post_chat([{"role": "user", "content": "hi"}], model="no-such-model-for-test-api")
        require(unknown.status_code == 404, f"unknown model answered {unknown.status_code}, expected 404")
        problem = error_shape_problem(unknown)
        require(problem is None, f"unknown model: {problem}")
        checked.append("404 unknown model")

        broken = self.http.post(
            "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        require(broken.status_code == 400, f"malformed JSON answered {broken.status_code}, expected 400")
        problem = error_shape_problem(broken)
        require(problem is None, f"malformed JSON: {problem}")
        checked.append("400 malformed JSON")

        if self.api_key:
            anonymous = httpx.post(
                f"{self.http.base_url}/v1/chat/completions",
                timeout=30,
                json=self._request([{"role": "user", "content": "hi"}]),
            )
            require(anonymous.status_code == 401, f"no API key answered {anonymous.status_code}, expected 401")
            problem = error_shape_problem(anonymous)
            require(problem is None, f"no API key: {problem}")
            checked.append("401 without key")
        return ", ".join(checked)

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        require(response.status_code == 200, f"/metrics answered {response.status_code}: {response.text[:200]}")
        content_type = response.headers.get("content-type", "")
        require(content_type.startswith("text/plain"), f"content-type is {content_type!r}")
        names = {line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE ")}
        engine = sorted(name for name in names if name.startswith("vllm:"))
        wrapper = sorted(name for name in names if name.startswith("vllm_api_"))
        require(bool(engine), "no engine series (vllm:*)")
        require(bool(wrapper), "no wrapper series (vllm_api_*)")
        return f"{len(engine)} engine and {len(wrapper)} wrapper metric families"

    # --- helpers --------------------------------------------------------------------

    def _capabilities(self) -> dict[str, Any]:
        if self.info is None:
            raise Skipped("endpoints unknown: /info failed")
        return self.info.get("capabilities") or CHAT_MODEL

    def _require_endpoint(self, path: str, what: str) -> None:
        if path not in self._capabilities()["endpoints"]:
            raise Skipped(f"the model does not serve {what} ({path} is not among its endpoints)")

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        require(response.status_code == 200, f"{path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def _require_modality(self, modality: str) -> None:
        if self.info is None:
            raise Skipped("modalities unknown: /info failed")
        if modality not in self.info["modalities"]:
            raise Skipped(f"model has no {modality} input (modalities: {', '.join(self.info['modalities'])})")

    def _request(
        self, messages: list[dict[str, Any]], model: str | None = None, stream: bool = False
    ) -> dict[str, Any]:
        if self.model is None and model is None:
            raise CheckFailed("no model name: /info and /v1/models failed; pass --model")
        return {
            "model": model or self.model,
            "messages": messages,
            "max_tokens": 16,
            "temperature": 0,
            "stream": stream,
        }

    def _post_chat(self, messages: list[dict[str, Any]], model: str | None = None) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json=self._request(messages, model))

    def _chat(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        response = self._post_chat(messages)
        require(response.status_code == 200, f"answered {response.status_code}: {response.text[:200]}")
        return response.json()

    @staticmethod
    def _media_message(part: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [part, {"type": "text", "text": "Describe this."}]}]

    @staticmethod
    def _media_reply(response: httpx.Response, what: str) -> str:
        require(response.status_code == 200, f"{what}: answered {response.status_code}: {response.text[:200]}")
        body = response.json()
        require(
            body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0, "usage reports no tokens"
        )
        return f"{what}, {body['usage']['prompt_tokens']} prompt tokens"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run_checks(checks: ApiChecks) -> list[Result]:
    results = []
    for name, check in checks.all():
        start = time.monotonic()
        try:
            status, detail = PASS, check()
        except Skipped as skip:
            status, detail = SKIP, str(skip)
        except CheckFailed as failure:
            status, detail = FAIL, str(failure)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as error:
            status, detail = FAIL, f"{type(error).__name__}: {error}"
        results.append(Result(name, status, detail, round(time.monotonic() - start, 3)))
    return results


def table(results: list[Result]) -> str:
    width = max(len(r.check) for r in results)
    lines = [f"{'CHECK'.ljust(width)}  RESULT  TIME     DETAIL"]
    for r in results:
        lines.append(f"{r.check.ljust(width)}  {r.status.upper().ljust(6)}  {r.seconds:6.2f}s  {r.detail}")
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a running vllm-inference-api deployment.")
    parser.add_argument("base_url", help="e.g. http://localhost:8000")
    parser.add_argument(
        "--api-key", help="sent as 'Authorization: Bearer KEY'; also checks that requests without it get 401"
    )
    parser.add_argument("--model", help="model name to send (default: served_model_name from /info)")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument(
        "--media-host",
        default="127.0.0.1",
        help="address of this machine the deployment can reach, for the image-by-URL check",
    )
    parser.add_argument("--media-port", type=int, default=0, help="port of the local media server (default: any free)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args(argv)

    checks = ApiChecks(args.base_url, args.api_key, args.model, args.media_host, args.media_port, args.timeout)
    results = run_checks(checks)
    print(table(results))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"base_url": args.base_url, "results": [asdict(r) for r in results]}, out, indent=2)
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
