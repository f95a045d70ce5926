"""client_example.py: media packing, retries and /generate worker affinity, against local servers.

The retry rules are the openai SDK's; these tests pin what a user of the
client relies on: 429 and 503 are retried (honouring Retry-After), a dropped
connection is retried, and after `max_retries` the error reaches the caller.
Worker affinity is shown against a stand-in for RunPod's load balancer: the
turns of a conversation return to the worker that stores it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import client_example as ce
from tests.media_server import sample_mp4
from tests.unit.test_bench_loadgen import free_port

PORT = free_port()  # a port of its own: several test runs may share the machine
COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


@dataclass
class Script:
    """What the stub answers, one entry per attempt: a status code, or "drop" to cut the connection."""

    answers: list[int | str]
    requests: list[dict[str, object]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    reply: dict[str, object] = field(default_factory=lambda: COMPLETION)  # the 200 body


@pytest.fixture
def stub() -> Iterator[Script]:
    script = Script(answers=[])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append(body)
            script.paths.append(self.path)
            answer = script.answers.pop(0) if script.answers else 200
            if answer == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            payload = json.dumps(
                script.reply
                if answer == 200
                else {"error": {"message": "busy", "type": "x", "param": None, "code": answer}}
            ).encode()
            self.send_response(int(answer))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if answer in (429, 503):
                self.send_header("retry-after-ms", "10")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield script
    server.shutdown()
    server.server_close()


def client(max_retries: int) -> ce.InferenceClient:
    return ce.InferenceClient(f"http://127.0.0.1:{PORT}", model="m", max_retries=max_retries, timeout_s=10)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(url: str) -> tuple[str, bytes]:
    header, data = url.split(",", 1)
    assert header.endswith(";base64")
    return header[len("data:") : -len(";base64")], base64.b64decode(data)


# --- media --------------------------------------------------------------------------


def test_image_from_path_bytes_and_pil_become_data_urls_with_their_mime(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    path = tmp_path / "photo.bin"  # the MIME type comes from the bytes, not the name
    path.write_bytes(jpeg.getvalue())

    assert decoded(ce.image_part(path)["image_url"]["url"]) == ("image/jpeg", jpeg.getvalue())
    assert decoded(ce.image_part(str(path))["image_url"]["url"]) == ("image/jpeg", jpeg.getvalue())
    assert decoded(ce.image_part(png_bytes())["image_url"]["url"]) == ("image/png", png_bytes())
    mime, data = decoded(ce.image_part(Image.new("RGB", (3, 2)))["image_url"]["url"])
    assert mime == "image/png" and Image.open(io.BytesIO(data)).size == (3, 2)


def test_image_and_video_urls_pass_through() -> None:
    assert ce.image_part("https://example.com/a.jpg") == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/a.jpg"},
    }
    assert ce.video_part("http://example.com/v.mp4") == {
        "type": "video_url",
        "video_url": {"url": "http://example.com/v.mp4"},
    }


def test_unknown_image_bytes_are_refused_with_the_accepted_formats() -> None:
    with pytest.raises(ValueError, match="PNG, JPEG"):
        ce.image_part(b"not an image")


def test_video_from_path_and_bytes(tmp_path: Path) -> None:
    mp4 = sample_mp4()
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4)
    assert decoded(ce.video_part(path)["video_url"]["url"]) == ("video/mp4", mp4)
    assert decoded(ce.video_part(mp4)["video_url"]["url"]) == ("video/mp4", mp4)


def test_user_message_puts_media_before_text() -> None:
    message = ce.user_message("What is it?", images=[png_bytes()], videos=["https://example.com/v.mp4"])
    assert [part["type"] for part in message["content"]] == ["image_url", "video_url", "text"]
    assert ce.user_message("plain") == {"role": "user", "content": "plain"}


def test_base_url_with_or_without_v1() -> None:
    assert ce.api_base("http://h:8000") == ce.api_base("http://h:8000/v1/") == "http://h:8000/v1"


# --- retries --------------------------------------------------------------------------


def test_429_and_503_are_retried_until_success(stub: Script) -> None:
    stub.answers = [429, 503, 200]
    reply = client(max_retries=2).chat("hi", images=[png_bytes()])
    assert reply.choices[0].message.content == "hi"
    assert len(stub.requests) == 3
    assert stub.requests[0] == stub.requests[2]  # the same request each time


def test_errors_reach_the_caller_after_max_retries(stub: Script) -> None:
    stub.answers = [503, 503, 503]
    with pytest.raises(openai.InternalServerError):
        client(max_retries=1).chat("hi")
    assert len(stub.requests) == 2


def test_client_errors_are_not_retried(stub: Script) -> None:
    stub.answers = [400]
    with pytest.raises(openai.BadRequestError):
        client(max_retries=3).chat("hi")
    assert len(stub.requests) == 1


def test_dropped_connection_is_retried(stub: Script) -> None:
    stub.answers = ["drop", 200]
    assert client(max_retries=1).chat("hi").choices[0].message.content == "hi"
    assert len(stub.requests) == 2


def test_async_client_retries_the_same_way(stub: Script) -> None:
    stub.answers = [429, 200]

    async def ask() -> str:
        async_client = ce.AsyncInferenceClient(f"http://127.0.0.1:{PORT}", model="m", max_retries=1, timeout_s=10)
        try:
            return (await async_client.chat("hi")).choices[0].message.content
        finally:
            await async_client.close()

    assert asyncio.run(ask()) == "hi"
    assert len(stub.requests) == 2


# --- /generate conversations and RunPod worker affinity ---------------------------------------


@dataclass
class LoadBalancerStandIn:
    """A stand-in for a RunPod load-balancing endpoint with two workers, each with its own store.

    RunPod itself cannot be reached from here. Like its load balancer, the stand-in
    names the serving worker in `X-Runpod-Worker-Id` (unless `names_workers` is off),
    routes a request whose header names a worker (`strict <id>`, `strict-resume <id>`
    or `<id>`) to that worker, and spreads the others round-robin. Like the wrapper,
    a worker answers 404 for a conversation its own store does not hold.
    """

    url: str = ""
    names_workers: bool = True
    stores: dict[str, set[str]] = field(default_factory=lambda: {"worker-a": set(), "worker-b": set()})
    seen: list[tuple[str | None, str | None]] = field(default_factory=list)  # (conversation_id, header) per request
    _turn: itertools.count = field(default_factory=itertools.count)

    def route(self, header: str | None) -> str:
        if header:
            return header.split()[-1]
        return sorted(self.stores)[next(self._turn) % len(self.stores)]


@pytest.fixture
def load_balancer() -> Iterator[LoadBalancerStandIn]:
    stand_in = LoadBalancerStandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            assert self.path == "/generate"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            header = self.headers.get(ce.WORKER_ID_HEADER)
            stand_in.seen.append((body.get("conversation_id"), header))
            worker = stand_in.route(header)
            conversation_id = body.get("conversation_id") or uuid.uuid4().hex
            if body.get("conversation_id") and conversation_id not in stand_in.stores[worker]:
                status, payload = (
                    404,
                    {
                        "error": {
                            "message": "No conversation",
                            "type": "not_found_error",
                            "param": "conversation_id",
                            "code": "conversation_not_found",
                        }
                    },
                )
            else:
                stand_in.stores[worker].add(conversation_id)
                status, payload = (
                    200,
                    {"response": f"{body['message']} (from {worker})", "conversation_id": conversation_id},
                )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if stand_in.names_workers:
                self.send_header(ce.WORKER_ID_HEADER, worker)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


def test_conversation_turns_go_back_to_the_worker_that_holds_them(load_balancer: LoadBalancerStandIn) -> None:
    client = ce.InferenceClient(load_balancer.url, max_retries=0, timeout_s=10)
    alice = client.generate("Hi, I am Alice.")
    bob = client.generate("Hi, I am Bob.")
    assert alice["response"].endswith("(from worker-a)") and bob["response"].endswith("(from worker-b)")
    for _ in range(3):
        assert client.generate("Again", conversation_id=alice["conversation_id"])["response"].endswith("worker-a)")
        assert client.generate("Again", conversation_id=bob["conversation_id"])["response"].endswith("worker-b)")
    # New conversations carry no header; each later turn names its worker, strictly by default.
    pinned = [(alice["conversation_id"], "strict worker-a"), (bob["conversation_id"], "strict worker-b")]
    assert load_balancer.seen == [(None, None), (None, None), *pinned * 3]


def test_without_the_worker_header_the_next_turn_can_land_on_another_worker(
    load_balancer: LoadBalancerStandIn,
) -> None:
    """What the client prevents: the stand-in spreads turns without a header across workers."""
    first = httpx.post(f"{load_balancer.url}/generate", json={"message": "Hi"}, timeout=10)
    second = httpx.post(
        f"{load_balancer.url}/generate",
        json={"message": "Again", "conversation_id": first.json()["conversation_id"]},
        timeout=10,
    )
    assert first.headers[ce.WORKER_ID_HEADER] != second.headers[ce.WORKER_ID_HEADER]
    assert second.status_code == 404


def test_no_worker_header_is_sent_when_the_server_names_none(load_balancer: LoadBalancerStandIn) -> None:
    load_balancer.names_workers = False
    client = ce.InferenceClient(load_balancer.url, max_retries=0, timeout_s=10)
    conversation_id = client.generate("Hi")["conversation_id"]
    with pytest.raises(openai.NotFoundError):  # the stand-in's second worker does not hold it
        client.generate("Again", conversation_id=conversation_id)
    assert [header for _, header in load_balancer.seen] == [None, None]


def test_async_client_pins_conversations_the_same_way(load_balancer: LoadBalancerStandIn) -> None:
    async def talk() -> list[str]:
        client = ce.AsyncInferenceClient(load_balancer.url, max_retries=0, timeout_s=10, affinity="strict-resume")
        try:
            first = await client.generate("Hi")
            return [
                (await client.generate("Again", conversation_id=first["conversation_id"]))["response"] for _ in range(3)
            ]
        finally:
            await client.close()

    assert all(reply.endswith("(from worker-a)") for reply in asyncio.run(talk()))
    assert [header for _, header in load_balancer.seen] == [None, *["strict-resume worker-a"] * 3]


def test_affinity_modes_write_runpods_header_values() -> None:
    for mode, expected in (("strict", "strict pod-1"), ("strict-resume", "strict-resume pod-1"), ("soft", "pod-1")):
        affinity = ce.WorkerAffinity(mode)
        affinity.remember("c1", "pod-1")
        assert affinity.headers("c1") == {ce.WORKER_ID_HEADER: expected}
        assert affinity.headers("c2") == {} and affinity.headers(None) == {}


def test_the_latest_worker_wins_and_old_conversations_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ce, "MAX_PINNED_CONVERSATIONS", 2)
    affinity = ce.WorkerAffinity()
    affinity.remember("c1", "pod-1")
    affinity.remember("c1", "pod-2")  # RunPod reports the worker that actually served the turn
    affinity.remember("c2", "pod-3")
    affinity.remember("c3", "pod-4")
    assert affinity.headers("c1") == {}
    assert affinity.headers("c2") == {ce.WORKER_ID_HEADER: "strict pod-3"}
    affinity.remember("c4", "pod-5")
    assert affinity.headers("c2") == {} and affinity.headers("c3") == {ce.WORKER_ID_HEADER: "strict pod-4"}


# --- tools, structured output, embeddings --------------------------------------------------


def completion_with(message: dict[str, object], finish_reason: str = "stop") -> dict[str, object]:
    return {**COMPLETION, "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}]}


WEATHER = ce.function_tool("get_weather", "The weather", {"type": "object", "properties": {"city": {"type": "string"}}})


def test_a_required_tool_call_comes_back_as_name_and_arguments(stub: Script) -> None:
    stub.reply = completion_with(
        {"content": None, "tool_calls": [{"id": "t1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        "tool_calls",
    )
    assert client(max_retries=0).call_tools("Weather in Paris?", [WEATHER]) == [("get_weather", {"city": "Paris"})]
    sent = stub.requests[0]
    assert sent["tool_choice"] == "required"
    assert sent["tools"] == [WEATHER] and WEATHER["function"]["strict"] is True


def test_a_tool_can_leave_its_arguments_unchecked() -> None:
    assert ce.function_tool("f", "d", {}, strict=False)["function"]["strict"] is False


def test_naming_the_function_to_call(stub: Script) -> None:
    stub.reply = completion_with({"content": None, "tool_calls": []}, "stop")
    assert client(max_retries=0).call_tools("Hi", [WEATHER], choice="get_weather") == []
    assert stub.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_structured_output_sends_the_schema_and_parses_the_reply(stub: Script) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    stub.reply = completion_with({"content": '{"age": 42}'})
    assert client(max_retries=0).structured("How old?", schema) == {"age": 42}
    assert stub.requests[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True},
    }


def test_embeddings_come_back_in_input_order(stub: Script) -> None:
    stub.reply = {
        "object": "list", "model": "m", "usage": {"prompt_tokens": 4, "total_tokens": 4},
        "data": [{"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                 {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}],
    }
    assert client(max_retries=0).embed(["a", "b"]) == [[1.0, 0.0], [0.0, 1.0]]
    assert stub.paths == ["/v1/embeddings"] and stub.requests[0]["input"] == ["a", "b"]


def test_demo_cli_prints_tool_calls_and_json(stub: Script, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = tmp_path / "weather.json"
    tool.write_text(json.dumps({"name": "get_weather", "parameters": {"type": "object"}}))
    stub.reply = completion_with(
        {"content": None, "tool_calls": [{"id": "t1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        "tool_calls",
    )
    base = ["--base-url", f"http://127.0.0.1:{PORT}", "--model", "m", "--max-retries", "0"]
    assert ce.main([*base, "--tool", str(tool), "Weather", "in", "Rome?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert stub.requests[-1]["messages"] == [{"role": "user", "content": "Weather in Rome?"}]

    stub.reply = completion_with({"content": '{"ok": true}'})
    assert ce.main([*base, "--json-schema", '{"type": "object"}', "Fine?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True}

    assert ce.main([*base, "--tool", '{"description": "no name"}', "Hi"]) == 1
    assert "name and parameters" in capsys.readouterr().err
