"""Random requests to every engine route: never a 5xx, and media the wrapper refuses never reach the engine.

Hypothesis draws requests for every JSON route of the route table
(`tests/e2e/fuzz_bodies.py`, one strategy per family of routes), from
almost valid to nonsense: media in each shape the route's engine reads,
valid, corrupt, oversized, bombs, broken base64 or URLs the server must not
fetch, media where no walker reads them, wrong types, non-JSON bodies. They
go to a wrapper with the default URL policy in front of the real tiny
Qwen2-VL CPU engine, which serves the generative routes and answers 404 on
the pooling and scoring ones. For every request:

- the answer is below 500, and every 4xx is an OpenAI-shaped JSON error;
- a request the wrapper must refuse (known by construction) gets a 4xx, and
  the engine's own request counter (`http_requests_total` in its /metrics,
  every handler, the 404s of routes it does not serve included) does not
  move: the engine never saw the request;
- /health stays 200 throughout, and no wrapper log line is an error.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings

from tests.e2e.conftest import VLM_MODEL
from tests.e2e.fuzz_bodies import (
    BAD_IMAGES,
    JSON_ROUTES,
    WRAPPER_SETTINGS,
    Case,
    data_url,
    deeply_nested,
    every_route,
)
from tests.media_server import sample_image
from tests.stack import Stack

EXAMPLES = 1500
HEALTH_EVERY = 25
JSON_HEADERS = {"Content-Type": "application/json"}
# Routes whose streams end with `data: [DONE]` (the others end with their own last event).
DONE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

BOMB = BAD_IMAGES[0].url
# An image no other test sends: an engine failure on it cannot spill into another test's engine cache.
OWN_IMAGE = data_url("image/png", sample_image("PNG", (37, 23)))
VALID_CHAT = {"model": VLM_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def json_case(route: str, body: dict[str, Any], refusal: str | None = None) -> Case:
    return Case(route, json.dumps(body).encode(), refusal)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


# Requests that once made the wrapper answer 500, break its log, or let media reach the engine unchecked.
KNOWN_EDGES = [
    Case("/v1/chat/completions", deeply_nested(json.dumps(VALID_CHAT).encode(), 100_000), "not JSON"),
    json_case("/v1/chat/completions", {**VALID_CHAT, "stream": True, "messages": [{"role": "user", "content": "\ud800"}]}),
    json_case("/v1/chat/completions", {**VALID_CHAT, "model": "\ud800"}),
    json_case("/v1/responses", {"model": VLM_MODEL, "input": [{"type": []}]}),
    json_case("/v1/messages", {"model": VLM_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": {}}]}]}),
    json_case(
        "/v1/responses",
        {"model": VLM_MODEL, "max_output_tokens": 1, "input": [
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "role": "user", "call_id": "c",
             "output": [{"type": "input_image", "image_url": BOMB, "detail": "auto"}]},
        ]},
        "image: pixel bomb in the output of a tool output item that also has a role",
    ),
    json_case(
        "/v1/chat/completions", {**VALID_CHAT, "messages": [{"role": "user", "content": image_part(BOMB)}]},
        "a media part as the content itself, not in a list",
    ),
    json_case(
        "/v1/chat/completions", {**VALID_CHAT, "messages": [{"role": "user", "content": [[image_part(BOMB)]]}]},
        "media in a list inside the content list",
    ),
    json_case(
        "/v1/chat/completions",
        {**VALID_CHAT, "messages": [{"role": "user", "content": [{"type": 5, "image_url": {"url": BOMB}}]}]},
        "a media part whose type is not a string",
    ),
    json_case(
        "/v1/completions", {"model": VLM_MODEL, "max_tokens": 1, "prompt": ["Hi", image_part(BOMB)]},
        "media in a list of texts",
    ),
    json_case(
        "/v1/embeddings", {"model": VLM_MODEL, "input": ["Hi", {"x": {"image_url": BOMB}}]},
        "media in an object without a role in a list of texts",
    ),
    # The engine answers these with a 500 (vLLM 0.32: an IndexError on an assistant message item without
    # content; the Qwen2-VL prompt update fails on an image in a developer message that follows another
    # message, and its cache then fails the next request with that image): the wrapper refuses them.
    json_case("/v1/responses", {"model": VLM_MODEL, "max_output_tokens": 1, "input": [
        {"role": "assistant", "type": "message", "content": []}]}, "a message item without content"),
    json_case("/v1/chat/completions", {**VALID_CHAT, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "developer", "content": [image_part(OWN_IMAGE)]}]},
        "media in a developer message"),
]  # fmt: skip


def engine_requests(http: httpx.Client, engine_url: str) -> dict[str, float]:
    """Requests the engine's HTTP server got so far, by handler (paths it does not serve count as "none")."""
    counts: dict[str, float] = {}
    for line in http.get(f"{engine_url}/metrics").text.splitlines():
        if line.startswith("http_requests_total{"):
            handler = line.split('handler="', 1)[1].split('"', 1)[0]
            counts[handler] = counts.get(handler, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def check_answer(case: Case, response: httpx.Response, reached_engine: bool) -> None:
    where = (case.route, response.status_code, response.text[:500], case.body[:500])
    origin = "the engine's answer, relayed" if reached_engine else "the wrapper's own answer"
    assert response.status_code < 500, (origin, *where)
    if response.status_code >= 400:
        # The wrapper's own errors and the engine's (FastAPI's {"detail": ...} included) arrive OpenAI-shaped.
        assert response.headers["content-type"] == "application/json", where
        assert response.json()["error"]["message"], where
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if case.route in DONE_ROUTES:
            assert events[-1] == "[DONE]", where
        for event in events:
            if event != "[DONE]":
                payload = json.loads(event)
                assert "error" not in payload and payload.get("type") != "error", (event, *where)
    else:
        response.json()


def test_random_requests_to_every_route(vlm_stack: Stack, wrapper) -> None:
    gateway = wrapper(vlm_stack.engine_url, **WRAPPER_SETTINGS)
    sent: Counter[str] = Counter()
    marked: Counter[str] = Counter()
    forwarded: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    with httpx.Client(base_url=gateway.base_url, timeout=120) as http:
        engine_seen = engine_requests(http, vlm_stack.engine_url)

        def answered_below_500_and_refused_before_the_engine(case: Case) -> None:
            nonlocal engine_seen
            response = http.post(case.route, content=case.body, headers=JSON_HEADERS)
            now = engine_requests(http, vlm_stack.engine_url)
            reached_engine, engine_seen = now != engine_seen, now
            sent[case.route] += 1
            statuses[response.status_code] += 1
            forwarded[case.route] += reached_engine
            check_answer(case, response, reached_engine)
            if case.refusal:
                marked[case.route] += 1
                assert 400 <= response.status_code < 500, (case.refusal, response.status_code, response.text[:500])
                assert not reached_engine, f"the engine got a request the wrapper must refuse: {case.refusal}"
            if sum(sent.values()) % HEALTH_EVERY == 0:
                assert http.get("/health").status_code == 200

        fuzz = given(case=every_route)(answered_below_500_and_refused_before_the_engine)
        for edge in KNOWN_EDGES:
            fuzz = example(case=edge)(fuzz)
        settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )(fuzz)()
        assert http.get("/health").status_code == 200

    print(f"statuses: {dict(sorted(statuses.items()))}")
    for route in JSON_ROUTES:
        print(f"{route}: {sent[route]} sent, {marked[route]} to refuse, {forwarded[route]} reached the engine")
    # The strategies still reach every route, both sides of the wrapper's checks.
    assert all(marked[route] and forwarded[route] for route in JSON_ROUTES), (marked, forwarded)
    errors = [line for line in gateway.logs() if line.get("level") in ("ERROR", "CRITICAL")]  # every line is JSON
    assert not errors, errors[:3]
