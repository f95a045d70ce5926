"""An image through the Responses and Messages APIs, on the tiny vision model.

The image is a base64 PNG; that it reached the model shows in the usage: the
same question costs more input tokens with the image than without.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx

from tests.e2e.clients import openai_client
from tests.e2e.conftest import VLM_MODEL
from tests.media_server import sample_image
from tests.stack import Stack

QUESTION = "Describe this."


def png_base64() -> str:
    return base64.b64encode(sample_image("PNG", (64, 64))).decode("ascii")


def test_an_image_through_the_responses_api(vlm_stack: Stack) -> None:
    client = openai_client(vlm_stack)

    def input_tokens(*parts: dict[str, Any]) -> int:
        reply = client.responses.create(
            model=VLM_MODEL, input=[{"role": "user", "content": [*parts, {"type": "input_text", "text": QUESTION}]}],
            max_output_tokens=4, temperature=0,
        )
        return reply.usage.input_tokens

    image = {"type": "input_image", "image_url": f"data:image/png;base64,{png_base64()}"}
    assert input_tokens(image) > input_tokens()


def test_an_image_through_the_messages_api(vlm_stack: Stack) -> None:
    def input_tokens(*blocks: dict[str, Any]) -> int:
        response = httpx.post(
            f"{vlm_stack.base_url}/v1/messages", timeout=180,
            json={"model": VLM_MODEL, "max_tokens": 4,
                  "messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": QUESTION}]}]},
        )
        assert response.status_code == 200, response.text
        return response.json()["usage"]["input_tokens"]

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_base64()}}
    assert input_tokens(image) > input_tokens()
