"""The foundation, end to end: the entrypoint serves real models through the wrapper.

Each test talks to `scripts/start.sh` running the real vLLM CPU engine, with
the official `openai` client, as a user of the image would.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import TEXT_MODEL, VLM_MODEL
from tests.stack import Stack


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_goes_from_503_to_200(text_stack: Stack) -> None:
    statuses = [status for status in text_stack.health_history if status]
    assert statuses[0] == 503, statuses[:5]
    assert statuses[-1] == 200
    body = httpx.get(f"{text_stack.base_url}/health").json()
    assert body["phase"] == "ready" and body["engine_healthy"] is True


def test_models_lists_served_model_name(text_stack: Stack) -> None:
    assert [model.id for model in client(text_stack).models.list()] == [TEXT_MODEL]


def test_chat_completion(text_stack: Stack) -> None:
    reply = client(text_stack).chat.completions.create(
        model=TEXT_MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0,
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8


def test_completions_endpoint(text_stack: Stack) -> None:
    reply = client(text_stack).completions.create(model=TEXT_MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.choices[0].text
    assert reply.usage.completion_tokens == 5


def test_prompt_over_max_model_len_is_a_400_from_the_engine(text_stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(text_stack).chat.completions.create(
            model=TEXT_MODEL, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4,
        )
    assert raised.value.status_code == 400
    assert "2048" in raised.value.message and "context" in raised.value.message.lower()
    assert httpx.get(f"{text_stack.base_url}/health").status_code == 200


def test_a_stream_the_engine_refuses_at_once_is_a_4xx_not_a_200(text_stack: Stack) -> None:
    """vLLM 0.32 begins a stream for an empty completions prompt, then ends it with an error event."""
    with pytest.raises(openai.BadRequestError) as raised:
        client(text_stack).completions.create(model=TEXT_MODEL, prompt=[""], max_tokens=4, stream=True)
    assert raised.value.status_code == 400 and "empty" in raised.value.message
    streamed = client(text_stack).completions.create(model=TEXT_MODEL, prompt="Hi", max_tokens=4, stream=True)
    assert sum(1 for chunk in streamed if chunk.choices) == 4


def test_engine_errors_in_fastapi_shape_reach_the_client_openai_shaped(text_stack: Stack) -> None:
    # The engine answers these two with FastAPI's {"detail": ...}: a route it does not
    # have, and a body nested beyond its parser's depth but within the wrapper's.
    unknown_route = httpx.post(f"{text_stack.base_url}/v1/no-such-route", json={}, timeout=30)
    nested = b'{"model": "%s", "messages": [], "x": %s%s}' % (TEXT_MODEL.encode(), b"[" * 960, b"]" * 960)
    too_deep = httpx.post(f"{text_stack.base_url}/v1/chat/completions", content=nested,
                          headers={"content-type": "application/json"}, timeout=30)
    for response, status in ((unknown_route, 404), (too_deep, 400)):
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text


def png_data_url(size: tuple[int, int] = (64, 48), color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_request_to_vision_language_model(vlm_stack: Stack) -> None:
    reply = client(vlm_stack).chat.completions.create(
        model=VLM_MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What colour is this?"},
            {"type": "image_url", "image_url": {"url": png_data_url()}},
        ]}],
        max_tokens=4,
    )
    assert reply.choices[0].message.content is not None
    # The image became tokens: far more prompt tokens than the text alone.
    text_only = client(vlm_stack).chat.completions.create(
        model=VLM_MODEL, messages=[{"role": "user", "content": "What colour is this?"}], max_tokens=1,
    )
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens
