"""One generation before `ready`, so the first user request does not pay for lazy initialisation.

The engine answers its health check once the model is loaded, but some of
its set-up waits for the first request: the chat template is compiled, the
detokenizer and the sampler run for the first time, and a vision model's
image processor is created on the first image (on the CPU engine with the
tiny Qwen2-VL, the first image request took 120-170 ms against ~30 ms for
the next ones). A RunPod worker is billed, and its client waits, from the
first 200 of /ping; so the supervisor sends these requests itself, straight
to the engine, while /ping still says 204.

What is sent: a chat completion of a few tokens (a completion when the model
has no chat template, an embedding for a pooling model), and for a model
that takes images, one chat completion with a small generated image. A
warm-up that fails or times out is logged and never fails the start: the
engine answered its health check, and the first user request will show any
real problem.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from PIL import Image

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 300.0
MAX_TOKENS = 4
IMAGE_SIDE = 64
PROMPT = "Hello"
# Not "Hello": on vLLM 0.32.0's CPU build, a pooling model whose first request is
# three tokens long loses its worker process (the engine dies); a sentence first,
# and short inputs after it, are fine.
EMBEDDING_INPUT = "The warm-up request: a short sentence of ordinary words."


@dataclass
class WarmupResult:
    sent: list[str] = field(default_factory=list)  # "chat", "image", ... each answered 200
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def small_image_data_url() -> str:
    """A PNG of IMAGE_SIDE x IMAGE_SIDE pixels in a data: URL."""
    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (120, 160, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def text_requests(model: str) -> list[tuple[str, str, dict[str, object]]]:
    """(name, path, body) to try in order until one is answered 200."""
    return [
        ("chat", "/v1/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}),
        ("completion", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS}),
        ("embedding", "/v1/embeddings", {"model": model, "input": EMBEDDING_INPUT}),
    ]


def image_request(model: str) -> tuple[str, str, dict[str, object]]:
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": small_image_data_url()}},
    ]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}
    return ("image", "/v1/chat/completions", body)


async def warm_up(
    session: aiohttp.ClientSession, engine_url: str, model: str, images: bool, timeout_s: float = REQUEST_TIMEOUT_S
) -> WarmupResult:
    """Send the warm-up requests to the engine; never raises for an engine that refuses or fails them."""
    result = WarmupResult()
    started = time.monotonic()
    chat_works = False
    for name, path, body in text_requests(model):
        if await _send(session, engine_url, name, path, body, timeout_s, result):
            chat_works = name == "chat"
            break
    if images and chat_works:
        await _send(session, engine_url, *image_request(model), timeout_s, result)
    result.seconds = round(time.monotonic() - started, 3)
    log = logger.info if result.sent else logger.warning
    log("warm-up done" if result.sent else "warm-up: the engine answered no warm-up request",
        extra={"sent": result.sent, "refused": result.failed, "seconds": result.seconds})
    return result


async def _send(
    session: aiohttp.ClientSession, engine_url: str, name: str, path: str, body: dict[str, object],
    timeout_s: float, result: WarmupResult,
) -> bool:
    try:
        async with session.post(
            engine_url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            await response.read()
            ok = response.status == 200
            if not ok:
                result.failed.append(f"{name}: HTTP {response.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.failed.append(f"{name}: {type(exc).__name__}")
        ok = False
    if ok:
        result.sent.append(name)
    return ok
