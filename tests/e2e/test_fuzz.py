"""Malformed chat requests never make the server fail: every answer is below 500.

Hypothesis builds chat completion requests of every shape, from almost
valid to nonsense: wrong or missing fields and types, messages and content
parts of unknown kinds, media parts with valid, corrupt, oversized or
refused images and videos, URLs the server must not fetch, raw non-JSON
bodies. They go to a wrapper with the default media policy in front of the
real tiny Qwen2-VL CPU engine. Whatever the input, the client gets a
success or a 4xx with a JSON error body (the engine's own 4xx included),
never a 5xx; every wrapper log line stays JSON, none is an error, and
/health stays 200 throughout.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import VLM_MODEL
from tests.media_server import png_claiming_size, sample_image, sample_mp4
from tests.stack import Stack

EXAMPLES = 200
HEALTH_EVERY = 25
FETCH_TIMEOUT_S = 2


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = sample_image("PNG", (40, 30))
WIDE_PNG = sample_image("PNG", (300, 40))  # over the wrapper's MAX_IMAGE_SIDE: downscaled
JPEG = sample_image("JPEG", (32, 32))
MP4 = sample_mp4()
VALID_IMAGE_URLS = [
    f"data:image/png;base64,{b64(PNG)}",
    f"data:image/jpeg;base64,{b64(JPEG)}",
    f"data:image/png;base64,{b64(WIDE_PNG)}",
]
# Images the wrapper passes on: odd modes, GIF, an aspect ratio the model's processor refuses (engine 400).
ODD_IMAGE_URLS = [
    f"data:image/jpeg;base64,{b64(sample_image('JPEG', (32, 32), 'CMYK'))}",
    f"data:image/png;base64,{b64(sample_image('PNG', (32, 32), '1'))}",
    f"data:image/gif;base64,{b64(sample_image('GIF', (32, 32), 'P'))}",
    f"data:image/png;base64,{b64(sample_image('PNG', (250, 1)))}",
]
VIDEO_URLS = [
    f"data:video/mp4;base64,{b64(MP4)}",
    f"data:video/mp4;base64,{b64(MP4[: len(MP4) // 2])}",  # truncated: passes the container check
    "data:video/mp4;base64," + b64(b"\0\0\0\x18ftypisom" + bytes(64)),  # an MP4 box header, then zeros
    f"data:video/jpeg;base64,{b64(JPEG)},{b64(JPEG)}",
]
BROKEN_DATA_URLS = [
    f"data:image/png;base64,{b64(PNG[:40])}",
    f"data:image/png;base64,{b64(png_claiming_size(50_000, 50_000))}",
    f"data:image/png;base64,{b64(b'not an image')}",
    f"data:video/mp4;base64,{b64(PNG)}",
    f"data:image/png,{b64(PNG)}",
    "data:image/png;base64,!!!",
    "data:;base64,",
    "data:",
]
REFUSED_URLS = [
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:1/x.png",
    "http://[::1]/x.png",
    "http://0x7f.1/x.png",
    "http://media.example.invalid/x.png",
    "ftp://example.invalid/x.png",
    "//no-scheme/x.png",
    "http://",
    "not a url",
]

# Text includes lone surrogates: legal as JSON escapes (\ud800), not encodable as UTF-8.
texts = st.text(max_size=30) | st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=6)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


urls = weighted(
    (4, st.sampled_from(VALID_IMAGE_URLS)),
    (1, st.sampled_from(ODD_IMAGE_URLS)),
    (3, st.sampled_from(BROKEN_DATA_URLS)),
    (3, st.sampled_from(REFUSED_URLS)),
    (1, st.text(max_size=20)),
)
url_values = weighted((5, st.fixed_dictionaries({"url": urls})), (2, urls), (1, json_values))


@st.composite
def parts(draw: st.DrawFn) -> Any:
    kind = draw(
        st.sampled_from(["text", "text", "image", "image", "video", "input_audio", "embeds", "unknown", "junk"])
    )
    if kind == "text":
        return {"type": "text", "text": draw(weighted((4, texts), (1, json_values)))}
    if kind == "image":
        part = {"image_url": draw(url_values)}
        if draw(st.booleans()):
            part["type"] = draw(st.sampled_from(["image_url", "input_image", "video_url", "text"]))
        return part
    if kind == "video":
        url = draw(st.sampled_from([*VIDEO_URLS, *BROKEN_DATA_URLS[3:5], *REFUSED_URLS[:2]]))
        return {"type": "video_url", "video_url": {"url": url}}
    if kind == "input_audio":
        audio = {"data": draw(st.sampled_from(["", b64(b"RIFF0000WAVE"), "!!"])), "format": draw(json_scalars)}
        return {"type": "input_audio", "input_audio": audio}
    if kind == "embeds":
        key = draw(st.sampled_from(["image_embeds", "video_embeds", "audio_embeds", "prompt_embeds", "image_pil"]))
        return {"type": draw(st.sampled_from([key, None])), key: draw(json_values | st.just(b64(PNG)))}
    if kind == "unknown":
        return {
            "type": draw(st.text(max_size=12)),
            **draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)),
        }
    return draw(json_values)


message = st.fixed_dictionaries(
    {
        "role": weighted(
            (6, st.just("user")), (2, st.sampled_from(["system", "assistant", "tool", "developer"])), (1, json_scalars)
        ),
        "content": weighted((3, st.lists(parts(), max_size=4)), (2, texts), (1, json_values)),
    },
    optional={"name": json_scalars, "tool_call_id": json_scalars, "tool_calls": json_values},
)
chat_bodies = st.fixed_dictionaries(
    {
        "model": weighted((8, st.just(VLM_MODEL)), (1, json_scalars)),
        "messages": weighted((8, st.lists(message, min_size=1, max_size=3)), (1, json_values)),
        # Always present and small when valid: an engine answer stays quick.
        "max_tokens": weighted((8, st.integers(1, 3)), (1, st.sampled_from([0, -1, 10**9, 1.5, "2", []]))),
    },
    optional={
        "temperature": st.floats(-1, 3) | json_scalars,
        "stream": weighted((3, st.booleans()), (1, json_scalars)),
        "stream_options": json_values,
        "n": st.sampled_from([1, 2, 0, -1, "1"]),
        "response_format": json_values,
        "tools": json_values,
        "logprobs": json_scalars,
        "seed": st.integers() | json_scalars,
        "stop": json_values,
        "logit_bias": json_values,
        "extra_field": json_values,
    },
)


def deeply_nested(body: dict[str, Any], depth: int) -> bytes:
    """`body` with a list nested `depth` levels deep as one more field (beyond any parser's recursion limit)."""
    return json.dumps(body)[:-1].encode() + b', "nested": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = weighted(
    (2, st.binary(max_size=40)),
    (2, json_values.map(lambda value: json.dumps(value).encode())),
    (1, chat_bodies.map(lambda body: json.dumps(body).encode()[:-3])),  # truncated JSON
    (2, st.builds(deeply_nested, chat_bodies, st.sampled_from([500, 990, 2_000, 100_000]))),
)
requests = weighted((5, chat_bodies.map(lambda body: json.dumps(body).encode())), (1, raw_bodies))
VALID_CHAT = {"model": VLM_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
# Shapes that once made the wrapper answer 500 or break its log: always tried.
KNOWN_EDGES = [
    deeply_nested(VALID_CHAT, 100_000),
    json.dumps({**VALID_CHAT, "stream": True, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
    json.dumps({**VALID_CHAT, "model": "\ud800"}).encode(),
]


def check_answer(response: httpx.Response, body: bytes) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500], body[:500])
    if response.status_code >= 400:
        # The wrapper's own errors and the engine's (FastAPI's {"detail": ...} included) arrive OpenAI-shaped.
        assert response.headers["content-type"] == "application/json", response.headers
        assert response.json()["error"]["message"], response.text
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-500:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), (event, body[:500])
    else:
        assert response.json()["choices"], response.text


def test_random_chat_requests_never_get_a_5xx(vlm_stack: Stack, wrapper) -> None:
    gateway = wrapper(
        vlm_stack.engine_url,
        SERVED_MODEL_NAME=VLM_MODEL,
        IMAGE_LIMIT="2",
        VIDEO_LIMIT="1",
        MAX_IMAGE_SIDE="256",
        MEDIA_FETCH_TIMEOUT_S=str(FETCH_TIMEOUT_S),
    )
    sent = 0
    statuses: dict[int, int] = {}

    with httpx.Client(base_url=gateway.base_url, timeout=120) as http:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(body=requests)
        @example(body=KNOWN_EDGES[0])
        @example(body=KNOWN_EDGES[1])
        @example(body=KNOWN_EDGES[2])
        def answered_below_500(body: bytes) -> None:
            nonlocal sent
            response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            check_answer(response, body)
            sent += 1
            if sent % HEALTH_EVERY == 0:
                assert http.get("/health").status_code == 200

        answered_below_500()
        assert http.get("/health").status_code == 200

    print(f"statuses over {sent} requests: {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 0, "no request was valid: the strategy no longer reaches the engine"
    assert sum(count for status, count in statuses.items() if 400 <= status < 500) > 0
    errors = [line for line in gateway.logs() if line.get("level") in ("ERROR", "CRITICAL")]  # every line is JSON
    assert not errors, errors[:3]
