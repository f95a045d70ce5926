"""API keys and CORS, end to end: what a client with, without or with a wrong key gets.

With `API_KEY=key-one,key-two` (two keys, for rotation) inference and the
operator routes (/metrics, /info) answer 401 in OpenAI's error shape unless
one of the keys is sent; either key works. Probes (/ping, /health*) stay open
for load balancers. `PUBLIC_METRICS=true` opens /metrics and /info only.
No key ever shows up in the logs or in /info. CORS headers are sent only
when `CORS_ALLOW_ORIGINS` names the origin. Each case is a wrapper-only
instance in front of the shared tiny text model's engine.
"""

from __future__ import annotations

import select
import socket

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import Stack

KEYS = ("key-one", "key-two")
WRONG_KEY = "key-three"
ORIGIN = "https://app.example"
PROTECTED_GETS = ("/metrics", "/info")
PROBES = ("/ping", "/health", "/health/live", "/health/ready")
CHAT = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(stack: Stack, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)


def get(stack: Stack, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{stack.base_url}{path}", headers=headers, timeout=30)


def assert_unauthorized(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == code
    assert error["message"]


@pytest.fixture
def keyed(text_stack: Stack, wrapper) -> Stack:
    return wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, API_KEY=",".join(KEYS))


def test_inference_needs_one_of_the_keys(keyed: Stack) -> None:
    assert_unauthorized(chat(keyed, {}), "missing_api_key")
    assert_unauthorized(chat(keyed, bearer(WRONG_KEY)), "invalid_api_key")
    for key in KEYS:
        response = chat(keyed, bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2


def test_official_client_gets_authentication_error_without_the_key(keyed: Stack) -> None:
    no_key = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=WRONG_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as raised:
        no_key.chat.completions.create(**CHAT)
    assert raised.value.status_code == 401
    with_key = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEYS[1], max_retries=0, timeout=60)
    assert [model.id for model in with_key.models.list()] == [TEXT_MODEL]


@pytest.mark.parametrize("path", PROTECTED_GETS)
def test_operator_routes_need_one_of_the_keys(keyed: Stack, path: str) -> None:
    assert_unauthorized(get(keyed, path), "missing_api_key")
    assert_unauthorized(get(keyed, path, bearer(WRONG_KEY)), "invalid_api_key")
    for key in KEYS:
        assert get(keyed, path, bearer(key)).status_code == 200


def test_probes_stay_open(keyed: Stack) -> None:
    for path in PROBES:
        assert get(keyed, path).status_code == 200, path


def test_keys_never_appear_in_logs_or_info(keyed: Stack) -> None:
    for key in (*KEYS, WRONG_KEY):
        chat(keyed, bearer(key))
        get(keyed, "/metrics", bearer(key))
    info = get(keyed, "/info", bearer(KEYS[0]))
    assert info.status_code == 200
    log = keyed.raw_log()
    assert keyed.wait_for_request_lines(lambda line: line["path"] == "/info", 1), "the requests above were logged"
    for key in (*KEYS, WRONG_KEY):
        assert key not in log
        assert key not in info.text


def test_public_metrics_opens_operator_routes_but_not_inference(text_stack: Stack, wrapper) -> None:
    stack = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, API_KEY=",".join(KEYS), PUBLIC_METRICS="true")
    for path in PROTECTED_GETS:
        assert get(stack, path).status_code == 200, path
    assert_unauthorized(chat(stack, {}), "missing_api_key")
    assert chat(stack, bearer(KEYS[0])).status_code == 200


PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_preflight_answered_for_allowed_origin(text_stack: Stack, wrapper) -> None:
    stack = wrapper(
        text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, API_KEY=",".join(KEYS), CORS_ALLOW_ORIGINS=ORIGIN
    )
    # A preflight carries no credentials: it must not need the key.
    preflight = httpx.options(f"{stack.base_url}/v1/chat/completions", headers=PREFLIGHT, timeout=30)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # A browser can read the answers, errors included.
    refused = chat(stack, {"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    answered = chat(stack, {"Origin": ORIGIN, **bearer(KEYS[0])})
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == ORIGIN
    # Another origin gets no permission.
    other = httpx.options(
        f"{stack.base_url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}, timeout=30
    )
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_allowed_origins(keyed: Stack) -> None:
    preflight = httpx.options(f"{keyed.base_url}/v1/chat/completions", headers=PREFLIGHT, timeout=30)
    answered = chat(keyed, {"Origin": ORIGIN, **bearer(KEYS[0])})
    assert answered.status_code == 200
    for response in (preflight, answered):
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]


def wrapper_rss(stack: Stack) -> int:
    """Resident memory of the wrapper processes (in wrapper-only mode: every process of the stack)."""
    return sum(process.memory_info().rss for process in [psutil.Process(stack.process.pid), *stack.descendants()])


def upload_without_end(stack: Stack, path: str, gib: int) -> tuple[bytes, int]:
    """POST a chunked body of up to `gib` GiB without a key; returns the answer's first bytes and the bytes sent."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
    sent = 0
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sock.setblocking(False)
        answer = b""
        try:
            while sent < gib << 30 and not answer:
                try:
                    answer = sock.recv(4096)
                except BlockingIOError:
                    pass
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    select.select([sock], [sock], [], 1)
        except OSError:
            pass  # the server closed the connection
        sock.setblocking(True)
        if not answer:
            answer = sock.recv(4096)
    return answer, sent


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/conversations"])
def test_an_unauthenticated_upload_of_gigabytes_is_refused_early_with_memory_flat(keyed: Stack, path: str) -> None:
    before = wrapper_rss(keyed)
    answer, sent = upload_without_end(keyed, path, gib=4)
    after = wrapper_rss(keyed)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent < 1 << 30, f"the wrapper read {sent >> 20} MiB of an unauthenticated upload"
    assert after - before < 50 << 20, f"the wrapper grew by {(after - before) >> 20} MiB"
    assert chat(keyed, bearer(KEYS[0])).status_code == 200, "still serving"
