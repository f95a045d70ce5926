"""The user-facing tools against real stacks: test_api.py and client_example.py.

`test_api.py` is what an operator runs against a fresh deployment, so it must
pass on a healthy stack, skip what the model cannot do with a reason, and fail
(exit 1, with the failing row named) when the deployment misbehaves. The last
part is shown with a stub server whose error bodies and stream are broken.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import client_example as ce
from tests.e2e.clients import MEDIA_PORT, ROOT, run_test_api, skipped, statuses
from tests.e2e.conftest import TEXT_MODEL, VLM_MODEL
from tests.stack import Stack, port

STUB_PORT = port(760)


# --- test_api.py against real stacks ---------------------------------------------------


def test_test_api_passes_on_text_stack_and_skips_media_with_reason(text_stack: Stack, tmp_path: Path) -> None:
    code, output, rows = run_test_api(text_stack.base_url, tmp_path)
    assert code == 0, output
    assert statuses(rows) == {
        "health": "pass",
        "info": "pass",
        "models": "pass",
        "text": "pass",
        "streaming": "pass",
        "tool calling": "skip",
        "structured output": "pass",
        "responses API": "pass",
        "messages API": "pass",
        "image by URL": "skip",
        "image as base64": "skip",
        "video": "skip",
        "embeddings": "skip",
        "rerank": "skip",
        "transcription": "skip",
        "error shapes": "pass",
        "metrics": "pass",
    }
    assert rows["video"]["detail"] == "model has no video input (modalities: text)"
    assert rows["tool calling"]["detail"] == "deployment advertises no tool calling (set TOOL_CALL_PARSER)"
    assert rows["embeddings"]["detail"].startswith("the model does not serve embeddings")
    assert "CHECK" in output and "10 passed, 0 failed, 7 skipped" in output


# What a chat model without a tool-call parser does not serve.
NOT_A_CHAT_MODELS_KIND = {"tool calling", "embeddings", "rerank", "transcription"}


def test_test_api_passes_every_check_on_vision_stack(vlm_stack: Stack, tmp_path: Path) -> None:
    code, output, rows = run_test_api(vlm_stack.base_url, tmp_path)
    assert code == 0, output
    assert "fail" not in statuses(rows).values(), output
    assert skipped(rows) == NOT_A_CHAT_MODELS_KIND, output
    assert f"127.0.0.1:{MEDIA_PORT}/check.png" in rows["image by URL"]["detail"]


def test_test_api_reports_private_media_refusal_as_skip(
    vlm_stack: Stack, wrapper: Callable[..., Stack], tmp_path: Path
) -> None:
    guarded = wrapper(
        vlm_stack.engine_url,
        SERVED_MODEL_NAME=VLM_MODEL,
        ALLOW_PRIVATE_MEDIA_URLS="false",
        IMAGE_LIMIT="2",
        VIDEO_LIMIT="1",
    )
    code, output, rows = run_test_api(guarded.base_url, tmp_path)
    assert code == 0, output
    assert rows["image by URL"]["status"] == "skip"
    assert rows["image by URL"]["detail"].startswith("deployment refuses private media URLs")
    assert rows["image as base64"]["status"] == "pass"


def test_test_api_with_api_key_checks_401_and_fails_without_key(
    vlm_stack: Stack, wrapper: Callable[..., Stack], tmp_path: Path
) -> None:
    protected = wrapper(
        vlm_stack.engine_url,
        SERVED_MODEL_NAME=VLM_MODEL,
        ALLOW_PRIVATE_MEDIA_URLS="true",
        IMAGE_LIMIT="2",
        VIDEO_LIMIT="1",
        API_KEY="k-test-api",
    )
    code, output, rows = run_test_api(protected.base_url, tmp_path, "--api-key", "k-test-api")
    assert code == 0, output
    assert "fail" not in statuses(rows).values() and skipped(rows) == NOT_A_CHAT_MODELS_KIND, output
    assert "401 without key" in rows["error shapes"]["detail"]

    code, output, rows = run_test_api(protected.base_url, tmp_path)
    assert code == 1
    assert rows["info"]["status"] == "fail" and "401" in rows["info"]["detail"]
    assert "k-test-api" not in output


# --- test_api.py against a broken deployment -------------------------------------------


class BrokenApi(BaseHTTPRequestHandler):
    """Answers like a healthy text deployment, except: errors lack the OpenAI shape and streams never end."""

    protocol_version = "HTTP/1.1"

    def _json(self, status: int, body: object, content_type: str = "application/json") -> None:
        payload = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        answers: dict[str, tuple[int, object, str]] = {
            "/ping": (200, {"status": "healthy"}, "application/json"),
            "/health": (200, {"phase": "ready"}, "application/json"),
            "/info": (
                200,
                {"model": "m", "served_model_name": "m", "max_model_len": 64, "modalities": ["text"]},
                "application/json",
            ),
            "/v1/models": (200, {"data": [{"id": "m"}]}, "application/json"),
            "/metrics": (
                200,
                (
                    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
                    "# TYPE vllm_api_requests counter\nvllm_api_requests_total 1\n"
                ),
                "text/plain; version=0.0.4",
            ),
        }
        status, body, content_type = answers.get(self.path, (404, {"detail": "Not Found"}, "application/json"))
        self._json(status, body, content_type)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            request = json.loads(raw)
        except ValueError:
            self._json(400, {"error": {"message": "bad JSON", "type": "BadRequestError", "param": None, "code": 400}})
            return
        if request["model"] != "m":
            self._json(404, {"detail": "model not found"})
        elif self.path == "/v1/responses":
            self._json(200, {"status": "completed", "usage": {"output_tokens": 1},
                             "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]})
        elif self.path == "/v1/messages":
            self._json(200, {"type": "message", "content": [{"type": "text", "text": "hi"}],
                             "stop_reason": "end_turn", "usage": {"output_tokens": 1}})
        elif request.get("response_format"):
            self._json(200, {"choices": [{"message": {"role": "assistant", "content": '"yes"'}, "finish_reason": "stop"}]})
        elif request.get("stream"):
            chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "length"}]}
            self._json(200, f"data: {json.dumps(chunk)}\n\n", "text/event-stream")
        else:
            self._json(
                200,
                {
                    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                },
            )

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def broken_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", STUB_PORT), BrokenApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{STUB_PORT}"
    server.shutdown()
    server.server_close()


def test_test_api_fails_on_broken_error_shape_and_unterminated_stream(broken_api: str, tmp_path: Path) -> None:
    code, output, rows = run_test_api(broken_api, tmp_path)
    assert code == 1
    assert statuses(rows) == {
        "health": "pass",
        "info": "pass",
        "models": "pass",
        "text": "pass",
        "streaming": "fail",
        "tool calling": "skip",
        "structured output": "pass",
        "responses API": "pass",
        "messages API": "pass",
        "image by URL": "skip",
        "image as base64": "skip",
        "video": "skip",
        "embeddings": "skip",
        "rerank": "skip",
        "transcription": "skip",
        "error shapes": "fail",
        "metrics": "pass",
    }
    assert rows["streaming"]["detail"] == "the stream did not end with 'data: [DONE]'"
    assert rows["error shapes"]["detail"].startswith("unknown model: no 'error' object")
    assert "FAIL" in output and "8 passed, 2 failed, 7 skipped" in output


# --- client_example.py -------------------------------------------------------------------


def test_client_chat_and_stream_on_text_stack(text_stack: Stack) -> None:
    client = ce.InferenceClient(text_stack.base_url, max_retries=0)
    assert client.model == TEXT_MODEL
    reply = client.chat("Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 6
    pieces = list(client.stream_chat("Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}))
    assert len(pieces) >= 2
    assert "".join(pieces) == reply.choices[0].message.content


def test_client_generate_continues_a_conversation_on_text_stack(text_stack: Stack) -> None:
    client = ce.InferenceClient(text_stack.base_url, max_retries=0)
    first = client.generate("Hi, I am Alice.", max_tokens=4)
    second = client.generate("What is my name?", conversation_id=first["conversation_id"], max_tokens=4)
    assert second["conversation_id"] == first["conversation_id"]
    assert second["tokens_generated"] >= 1
    # A pod or a local server names no RunPod worker, so nothing is pinned.
    assert client.affinity.headers(first["conversation_id"]) == {}


def test_client_sends_an_image_from_a_path(vlm_stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "red.jpg"
    Image.new("RGB", (48, 32), (200, 20, 20)).save(path)
    text_only = ce.InferenceClient(vlm_stack.base_url, max_retries=0).chat("Describe", max_tokens=4)
    with_image = ce.InferenceClient(vlm_stack.base_url, max_retries=0).chat("Describe", images=[path], max_tokens=4)
    # The image reached the model: it costs prompt tokens.
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_client_demo_cli_with_image(vlm_stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(path)
    for extra in ([], ["--stream", "--async"]):
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "client_example.py"),
                "--base-url",
                vlm_stack.base_url,
                "--max-tokens",
                "4",
                "--image",
                str(path),
                *extra,
                "What is this?",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()

