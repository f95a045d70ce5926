"""Whatever a client sends to any route, prepare_media answers with a 4xx or succeeds.

Hypothesis builds random bodies for every route of the table: chat
messages, Responses items, Anthropic blocks and sources, pooling inputs,
score/rerank documents; content as strings, lists, junk; parts typed,
untyped, with uuids, with URLs that are valid, malformed, private,
redirecting, or base64 payloads that are images, videos, bombs or garbage.
A local server plays the public host. Any exception other than an
`APIError` with a 4xx status would be a 500 for the client: a bug. When the
request is accepted, the counts are within the limits and every piece of
media the engine will read is inline data: nothing is left for it to fetch.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import load_settings
from app.errors import APIError
from app.media import MEDIA_ROUTES, MediaFetcher, MediaPolicy, prepare_media
from app.media.routes import ROUTES
from app.media.walk import Walk
from tests.media_server import MediaServer, StaticResolver, png_claiming_size, sample_image, sample_mp4

TEST_HOST = "images.example.test"
PNG = sample_image("PNG", (40, 30))
MP4 = sample_mp4()
PAYLOADS = [
    base64.b64encode(data).decode()
    for data in (PNG, sample_image("GIF", (20, 20), "P"), MP4, png_claiming_size(100_000, 100_000), PNG[:60], b"text")
] + ["", "!!!!", "AAAA", "AAA=", "a,b"]
PART_TYPES = [
    "text",
    "image_url",
    "video_url",
    "input_image",
    "audio_url",
    "input_audio",
    "image_embeds",
    "input_file",
    "refusal",
    "bogus",
]
MEDIA_KEYS = ["image_url", "video_url", "audio_url", "input_audio", "image_embeds", "url"]
FIXED_HOSTS = [
    "127.0.0.1", "[::1]", "10.0.0.1", "2130706433", "0x7f.1", "unknown.example.test", "[::ffff:127.0.0.1]",
    "169.254.169.254", "0.0.0.0", "bad host", "[zz::1]", "",
]  # fmt: skip
PATHS = ["/x.png", "/v.mp4", "/text", "/go-private", "/missing", "/big", ""]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight (`|` would flatten and weigh evenly)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def strategies(port: int) -> st.SearchStrategy[dict[str, Any]]:
    hosts = st.sampled_from([f"{TEST_HOST}:{port}", *FIXED_HOSTS])
    schemes = st.sampled_from(["http://", "https://", "HTTP://", "file://", "ftp://", "gopher://", ""])
    remote_urls = st.builds(lambda s, h, p: f"{s}{h}{p}", schemes, hosts, st.sampled_from(PATHS))
    data_urls = st.builds(
        lambda media_type, encoding, payload: f"data:{media_type}{encoding},{payload}",
        st.sampled_from(["image/png", "image/jpeg", "video/mp4", "video/jpeg", "", "text/plain"]),
        st.sampled_from([";base64", "", ";charset=utf-8;base64", ";BASE64"]),
        st.sampled_from(PAYLOADS) | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
    )
    urls = weighted((3, data_urls), (3, remote_urls), (1, st.text(max_size=30)))
    url_values = weighted(
        (4, st.fixed_dictionaries({"url": urls})),
        (2, urls),
        (1, st.fixed_dictionaries({"url": json_scalars})),
        (1, json_scalars),
    )

    @st.composite
    def parts(draw: st.DrawFn) -> dict[str, Any]:
        part_type = draw(st.sampled_from(["image_url", "video_url", "input_image", "audio_url", "text", "anything"]))
        if part_type == "text":
            return {"type": "text", "text": draw(json_scalars)}
        if part_type == "anything":
            part: dict[str, Any] = {}
            if draw(st.booleans()):
                part["type"] = draw(st.sampled_from(PART_TYPES) | json_scalars)
            for key in draw(st.lists(st.sampled_from(MEDIA_KEYS), max_size=2, unique=True)):
                part[key] = draw(url_values)
            return part
        key = "image_url" if part_type == "input_image" else part_type
        part = {key: draw(url_values)}
        shape = draw(st.sampled_from(["typed", "untyped", "uuid"]))
        if shape != "untyped":
            part["type"] = part_type
        if shape == "uuid":
            part["uuid"] = draw(st.text(max_size=4))
        return part

    part_lists = st.lists(parts(), min_size=1, max_size=4)
    contents = weighted((6, part_lists), (2, st.lists(parts() | json_scalars, max_size=3)), (1, json_scalars))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": contents})
    messages = weighted(
        (6, st.lists(message, min_size=1, max_size=3)), (1, st.lists(message | json_scalars, max_size=2))
    )
    sources = weighted(
        (3, st.fixed_dictionaries({"type": st.just("url"), "url": urls})),
        (3, st.builds(lambda p: {"type": "base64", "media_type": "image/png", "data": p}, st.sampled_from(PAYLOADS))),
        (1, st.fixed_dictionaries({}, optional={"type": json_scalars, "url": urls, "data": json_scalars})),
        (1, json_scalars),
    )
    anthropic_image = st.fixed_dictionaries({"type": st.just("image"), "source": sources})
    blocks = st.lists(
        anthropic_image
        | st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)})
        | st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.just("t"),
                                 "content": st.lists(anthropic_image | json_scalars, max_size=3)})
        | st.fixed_dictionaries({"type": st.sampled_from(["document", "bogus"]), "source": sources}),
        max_size=4,
    )  # fmt: skip
    anthropic_messages = st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": blocks}),
        min_size=1,
        max_size=3,
    )
    tool_outputs = st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": st.just("c"), "output": contents}
    )
    score_inputs = st.lists(st.fixed_dictionaries({"content": contents}) | st.text(max_size=3), max_size=3)
    bodies = {
        "chat": st.fixed_dictionaries({"model": st.just("org/model"), "messages": messages}),
        "batch": st.fixed_dictionaries({"messages": st.lists(messages, max_size=2)}),
        "responses": st.fixed_dictionaries({"input": st.lists(message | tool_outputs, max_size=3) | json_scalars}),
        "anthropic": st.fixed_dictionaries({"messages": anthropic_messages}, optional={"system": blocks}),
        "pooling": st.fixed_dictionaries({}, optional={"input": messages | st.lists(messages), "messages": messages}),
        "scoring": st.fixed_dictionaries({"query": score_inputs, "documents": score_inputs}),
        "junk": st.fixed_dictionaries(
            {}, optional={"messages": json_scalars | st.dictionaries(st.text(max_size=3), contents)}
        ),
    }
    return st.sampled_from(sorted(MEDIA_ROUTES)).flatmap(
        lambda route: st.tuples(st.just(route), bodies[FAMILY.get(route, "chat")] | bodies["junk"])
    )


FAMILY = {
    "/v1/chat/completions/batch": "batch",
    "/v1/responses": "responses",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
    "/v1/embeddings": "pooling",
    "/pooling": "pooling",
    "/classify": "pooling",
    **dict.fromkeys(["/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"], "scoring"),
}


def left_for_the_engine_to_fetch(route: str, body: dict[str, Any]) -> list[str]:
    walk = Walk()
    ROUTES[route].walker(body, walk)
    return [ref.url for ref in walk.media if ref.url is not None and not ref.url.startswith("data:")]


def test_random_bodies_on_every_route_get_a_4xx_or_succeed() -> None:
    base = MediaPolicy.from_settings(
        load_settings({"IMAGE_LIMIT": "2", "VIDEO_LIMIT": "1", "MAX_IMAGE_SIDE": "16", "MEDIA_FETCH_TIMEOUT_S": "2"}),
        frozenset({"text", "image", "video"}),
    )
    trusted = frozenset({(TEST_HOST, ipaddress.ip_address("127.0.0.1"))})
    policy = dataclasses.replace(base, urls=dataclasses.replace(base.urls, trusted_addresses=trusted))
    resolver = StaticResolver({TEST_HOST: [["127.0.0.1"]], "unknown.example.test": [["10.9.8.7"]]})

    with asyncio.Runner() as runner:
        server = runner.run(MediaServer().__aenter__())
        server.add_file("/x.png", PNG, "image/png")
        server.add_file("/v.mp4", MP4, "video/mp4")
        server.add_file("/text", b"hello", "text/plain")
        server.add_redirect("/go-private", "http://10.0.0.1/x.png")
        server.add_stream("/big", policy.max_image_bytes + 1, declare_length=False)
        fetcher = MediaFetcher(policy.urls, resolver=resolver)
        runner.run(fetcher.start())

        @settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(strategies(server.port))
        def answers_4xx_or_succeeds(request: tuple[str, dict[str, Any]]) -> None:
            route, body = request
            try:
                counts = runner.run(prepare_media(route, body, policy, fetcher))
            except APIError as error:
                assert 400 <= error.status < 500, error
                assert error.message
            else:
                assert min(counts.text, counts.image, counts.video) >= 0
                assert counts.image <= policy.image_limit and counts.video <= policy.video_limit
                assert left_for_the_engine_to_fetch(route, body) == []

        try:
            answers_4xx_or_succeeds()
        finally:
            runner.run(fetcher.close())
            runner.run(server.__aexit__(None, None, None))
