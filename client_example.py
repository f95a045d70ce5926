#!/usr/bin/env python3
"""A small client for the API, built on the official `openai` SDK.

The deployment speaks the OpenAI chat API, so the SDK does the HTTP work; what
it leaves to every caller is packing local media into messages (base64 data
URLs with the right MIME type, video parts) and deciding how to retry. This
module does both once, synchronously and with asyncio, and doubles as a demo:

    python client_example.py --base-url http://localhost:8000 "Describe this" --image cat.jpg
    python client_example.py --base-url URL --stream "Tell me a story"
    python client_example.py --base-url URL --video clip.mp4 "What happens here?"
    python client_example.py --base-url URL --async --image https://example.com/cat.png "What is it?"
    python client_example.py --base-url URL --json-schema '{"type": "object", ...}' "Invent a person"
    python client_example.py --base-url URL --tool weather.json "What is the weather in Paris?"
    python client_example.py --base-url URL --embed "first text" "second text"

Tool calling needs a deployment with TOOL_CALL_PARSER set; embeddings need an
embedding model (or RUNNER=pooling with CONVERT=embed); see the README.

`/generate` conversations (`generate()`): on a RunPod Serverless endpoint with
several workers, each conversation is stored by the worker that started it
(unless the deployment sets `CONVERSATIONS_DB_URL`). RunPod names that worker in
the `X-Runpod-Worker-Id` response header; the client remembers it per
conversation and sends it back with the conversation's next turns, so they
reach the same worker (see `WorkerAffinity`):

    client = InferenceClient("https://ENDPOINT_ID.api.runpod.ai", api_key=RUNPOD_API_KEY)
    first = client.generate("Hi, I am Alice.")
    client.generate("What is my name?", conversation_id=first["conversation_id"])

Retries: the SDK retries 408, 409, 429, every 5xx (503 while the model loads
or the server drains) and connection errors, with exponential backoff from
0.5 s up to 8 s (less up to 25 % jitter). A `Retry-After` (or
`retry-after-ms`) of up to two minutes replaces the backoff; a longer one ends
the retries. Only the number of retries is ours to choose: `max_retries`
(default 4, so five attempts). A stream is retried only before its first byte.

Needs: `openai` (and `pillow` to send PIL images).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import mimetypes
import os
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import httpx2
import openai
from openai.types.chat import ChatCompletion

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# Union, not `|`: PIL is optional, so its Image type is only a string here.
ImageInput = Union[str, Path, bytes, "PILImage"]
VideoInput = str | Path | bytes
Message = dict[str, Any]

DEFAULT_MAX_RETRIES = 4
DEFAULT_TIMEOUT_S = 600.0
WORKER_ID_HEADER = "X-Runpod-Worker-Id"
# Conversations whose worker the client remembers; the least recently used is forgotten first.
MAX_PINNED_CONVERSATIONS = 10_000
AffinityMode = Literal["strict", "strict-resume", "soft"]
REMOTE_PREFIXES = ("http://", "https://", "data:")
# Magic numbers of the formats the image processors of vLLM models accept.
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their signature."""
    for signature, mime in IMAGE_SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("unrecognised image data: send PNG, JPEG, WebP, GIF or BMP bytes")


def video_mime(data: bytes, name: str | None = None) -> str:
    """The MIME type of encoded video bytes: from the file name, else the container signature."""
    guessed = mimetypes.guess_type(name)[0] if name else None
    if guessed and guessed.startswith("video/"):
        return guessed
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    raise ValueError("unrecognised video data: send MP4 or WebM, or a file name with its extension")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(image: ImageInput) -> dict[str, Any]:
    """An `image_url` content part from a URL, a file path, encoded bytes or a PIL image."""
    if isinstance(image, str) and image.startswith(REMOTE_PREFIXES):
        url = image
    elif isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
        url = data_url(data, image_mime(data))
    elif isinstance(image, bytes):
        url = data_url(image, image_mime(image))
    else:
        # A PIL image: PNG is lossless and every image processor reads it.
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = data_url(buffer.getvalue(), "image/png")
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(video: VideoInput) -> dict[str, Any]:
    """A `video_url` content part (vLLM's extension) from a URL, a file path or encoded bytes."""
    if isinstance(video, str) and video.startswith(REMOTE_PREFIXES):
        url = video
    elif isinstance(video, (str, Path)):
        data = Path(video).read_bytes()
        url = data_url(data, video_mime(data, str(video)))
    else:
        url = data_url(video, video_mime(video))
    return {"type": "video_url", "video_url": {"url": url}}


def user_message(text: str, images: Iterable[ImageInput] = (), videos: Iterable[VideoInput] = ()) -> Message:
    """A user turn: the media first, then the text (the order most vision models were trained on)."""
    parts = [image_part(image) for image in images] + [video_part(video) for video in videos]
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def as_messages(
    prompt: str | Sequence[Message], images: Iterable[ImageInput], videos: Iterable[VideoInput]
) -> list[Message]:
    if isinstance(prompt, str):
        return [user_message(prompt, images, videos)]
    return list(prompt)


def function_tool(name: str, description: str, parameters: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """A tool definition for `tools=`. `strict` makes the server hold the arguments to `parameters`."""
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters, "strict": strict},
    }


def api_base(base_url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> the SDK's base URL (`.../v1`)."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def server_root(base_url: str) -> str:
    """`http://host:8000/v1` or `http://host:8000` -> `http://host:8000`, where /generate lives."""
    return api_base(base_url).removesuffix("/v1")


def generate_body(message: str, conversation_id: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    body = {"message": message, **params}
    if conversation_id:
        body["conversation_id"] = conversation_id
    return body


class WorkerAffinity:
    """Which RunPod Serverless worker holds each `/generate` conversation.

    A load-balancing endpoint names the worker that served a response in
    `X-Runpod-Worker-Id` and routes a request that sends the header back to that
    worker. The modes are RunPod's: `strict` (the default) uses only that worker,
    waits up to about 5 minutes while it is at capacity (then 400), and gets
    RunPod's 404 `affinity_worker_gone` once the worker is gone, with the
    conversations it stored; `strict-resume` also resumes the worker when it was
    scaled down; `soft` prefers it but lets RunPod pick another worker when it is
    busy or gone, and that worker answers 404 `conversation_not_found`. Servers
    that set no header (a pod, a local run) pin nothing.
    """

    def __init__(self, mode: AffinityMode = "strict") -> None:
        self.mode = mode
        self._workers: OrderedDict[str, str] = OrderedDict()

    def headers(self, conversation_id: str | None) -> dict[str, str]:
        """The header that sends a turn of this conversation to its worker (none when unknown)."""
        worker = self._workers.get(conversation_id) if conversation_id else None
        if worker is None:
            return {}
        return {WORKER_ID_HEADER: worker if self.mode == "soft" else f"{self.mode} {worker}"}

    def remember(self, conversation_id: str | None, worker: str | None) -> None:
        """Pin the conversation to the worker that served its latest turn."""
        if not conversation_id or not worker:
            return
        self._workers[conversation_id] = worker
        self._workers.move_to_end(conversation_id)
        while len(self._workers) > MAX_PINNED_CONVERSATIONS:
            self._workers.popitem(last=False)


class InferenceClient:
    """Chat with a deployment; `model` defaults to the one it serves."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        affinity: AffinityMode = "strict",
    ) -> None:
        # The SDK insists on a key; a deployment without API_KEY ignores it.
        self.openai = openai.OpenAI(
            base_url=api_base(base_url),
            api_key=api_key or "unused",
            max_retries=max_retries,
            timeout=timeout_s,
        )
        self._model = model
        self.server_url = server_root(base_url)
        self.affinity = WorkerAffinity(affinity)

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.openai.models.list().data[0].id
        return self._model

    def chat(
        self,
        prompt: str | Sequence[Message],
        images: Iterable[ImageInput] = (),
        videos: Iterable[VideoInput] = (),
        **params: Any,
    ) -> ChatCompletion:
        """One completion. `params` go to the API as they are (max_tokens, temperature, ...)."""
        return self.openai.chat.completions.create(
            model=self.model,
            messages=as_messages(prompt, images, videos),
            **params,
        )

    def call_tools(
        self, prompt: str | Sequence[Message], tools: Sequence[dict[str, Any]], choice: str = "required", **params: Any
    ) -> list[tuple[str, dict[str, Any]]]:
        """The model's tool calls as (function name, arguments): `choice` is required, auto, or a function name."""
        tool_choice: Any = choice
        if choice not in ("required", "auto", "none"):
            tool_choice = {"type": "function", "function": {"name": choice}}
        reply = self.chat(prompt, tools=list(tools), tool_choice=tool_choice, **params)
        calls = reply.choices[0].message.tool_calls or []
        return [(call.function.name, json.loads(call.function.arguments)) for call in calls]

    def structured(self, prompt: str | Sequence[Message], schema: dict[str, Any], **params: Any) -> Any:
        """A reply constrained to the JSON schema, parsed."""
        response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        reply = self.chat(prompt, response_format=response_format, **params)
        return json.loads(reply.choices[0].message.content or "null")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order (an embedding model)."""
        reply = self.openai.embeddings.create(model=self.model, input=list(texts))
        return [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]

    def stream_chat(
        self,
        prompt: str | Sequence[Message],
        images: Iterable[ImageInput] = (),
        videos: Iterable[VideoInput] = (),
        **params: Any,
    ) -> Iterator[str]:
        """The completion's text, piece by piece, as the server generates it."""
        stream = self.openai.chat.completions.create(
            model=self.model,
            messages=as_messages(prompt, images, videos),
            stream=True,
            **params,
        )
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content

    def generate(self, message: str, conversation_id: str | None = None, **params: Any) -> dict[str, Any]:
        """One `/generate` turn, continuing `conversation_id` (or starting one); the JSON reply.

        `params` go to the API as they are (max_tokens, temperature, system, ...).
        The turn goes to the RunPod worker that holds the conversation.
        """
        response = self.openai.post(
            f"{self.server_url}/generate",
            cast_to=httpx2.Response,
            body=generate_body(message, conversation_id, params),
            options={"headers": self.affinity.headers(conversation_id)},
        )
        reply: dict[str, Any] = response.json()
        self.affinity.remember(reply.get("conversation_id"), response.headers.get(WORKER_ID_HEADER))
        return reply


class AsyncInferenceClient:
    """The asyncio twin of `InferenceClient`, for many requests at once."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        affinity: AffinityMode = "strict",
    ) -> None:
        self.openai = openai.AsyncOpenAI(
            base_url=api_base(base_url),
            api_key=api_key or "unused",
            max_retries=max_retries,
            timeout=timeout_s,
        )
        self._model = model
        self.server_url = server_root(base_url)
        self.affinity = WorkerAffinity(affinity)

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self.openai.models.list()).data[0].id
        return self._model

    async def chat(
        self,
        prompt: str | Sequence[Message],
        images: Iterable[ImageInput] = (),
        videos: Iterable[VideoInput] = (),
        **params: Any,
    ) -> ChatCompletion:
        return await self.openai.chat.completions.create(
            model=await self.model(),
            messages=as_messages(prompt, images, videos),
            **params,
        )

    async def stream_chat(
        self,
        prompt: str | Sequence[Message],
        images: Iterable[ImageInput] = (),
        videos: Iterable[VideoInput] = (),
        **params: Any,
    ) -> AsyncIterator[str]:
        stream = await self.openai.chat.completions.create(
            model=await self.model(),
            messages=as_messages(prompt, images, videos),
            stream=True,
            **params,
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content

    async def generate(self, message: str, conversation_id: str | None = None, **params: Any) -> dict[str, Any]:
        """One `/generate` turn; see `InferenceClient.generate`."""
        response = await self.openai.post(
            f"{self.server_url}/generate",
            cast_to=httpx2.Response,
            body=generate_body(message, conversation_id, params),
            options={"headers": self.affinity.headers(conversation_id)},
        )
        reply: dict[str, Any] = response.json()
        self.affinity.remember(reply.get("conversation_id"), response.headers.get(WORKER_ID_HEADER))
        return reply

    async def close(self) -> None:
        await self.openai.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a vllm-inference-api deployment.")
    parser.add_argument("prompt", nargs="+", help="the user message (with --embed: each text to embed)")
    parser.add_argument(
        "--base-url",
        default=os.environ.get("BASE_URL", "http://localhost:8000"),
        help="deployment URL (default: $BASE_URL or http://localhost:8000)",
    )
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="bearer key (default: $API_KEY)")
    parser.add_argument("--model", help="model name (default: the one the deployment serves)")
    parser.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--async", dest="use_async", action="store_true", help="use the asyncio client")
    parser.add_argument(
        "--json-schema", help="answer as JSON matching this schema (inline JSON or a file); prints the JSON"
    )
    parser.add_argument(
        "--tool", action="append", default=[],
        help="a function the model must call, as JSON {name, description, parameters} inline or in a file "
        "(repeatable); prints the calls",
    )
    parser.add_argument("--embed", action="store_true", help="print the embedding of each prompt text")
    parser.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES)
    return parser.parse_args(argv)


def _json_argument(value: str) -> Any:
    """Inline JSON, or the path of a JSON file."""
    return json.loads(value if value.lstrip().startswith(("{", "[")) else Path(value).read_text())


def _run_sync(args: argparse.Namespace) -> None:
    client = InferenceClient(args.base_url, args.api_key, args.model, max_retries=args.max_retries)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.embed:
        for text, vector in zip(args.prompt, client.embed(args.prompt), strict=True):
            print(json.dumps({"text": text, "dimensions": len(vector), "embedding": vector}))
        return
    prompt = " ".join(args.prompt)
    if args.json_schema:
        print(json.dumps(client.structured(prompt, _json_argument(args.json_schema), **params), indent=2))
        return
    if args.tool:
        definitions = [_json_argument(tool) for tool in args.tool]
        if not all(isinstance(d, dict) and "name" in d and "parameters" in d for d in definitions):
            raise ValueError("each --tool needs a JSON object with name and parameters")
        tools = [function_tool(d["name"], d.get("description", ""), d["parameters"]) for d in definitions]
        for name, arguments in client.call_tools(prompt, tools, **params):
            print(json.dumps({"name": name, "arguments": arguments}))
        return
    if args.stream:
        for piece in client.stream_chat(prompt, args.image, args.video, **params):
            print(piece, end="", flush=True)
        print()
    else:
        print(client.chat(prompt, args.image, args.video, **params).choices[0].message.content)


async def _run_async(args: argparse.Namespace) -> None:
    client = AsyncInferenceClient(args.base_url, args.api_key, args.model, max_retries=args.max_retries)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    prompt = " ".join(args.prompt)
    try:
        if args.stream:
            async for piece in client.stream_chat(prompt, args.image, args.video, **params):
                print(piece, end="", flush=True)
            print()
        else:
            print((await client.chat(prompt, args.image, args.video, **params)).choices[0].message.content)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.use_async:
            asyncio.run(_run_async(args))
        else:
            _run_sync(args)
    except openai.APIStatusError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as error:
        print(f"error: cannot reach {args.base_url}: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
