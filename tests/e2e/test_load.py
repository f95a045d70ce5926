"""Under overload and over many requests the wrapper stays correct and does not leak.

Load: 200 streaming clients for 60 seconds against a wrapper allowed 32
requests in flight and 64 waiting. Every request ends as a complete stream
or as a documented refusal (429 `queue_full`, 503 `queue_timeout`, each with
an OpenAI error body and `Retry-After`); nothing hangs, no connection drops,
and afterwards the wrapper and the engine are idle and healthy again, with
every concurrency slot free.

Soak: 1,000 warm-up requests, then 10,000 more through one wrapper process;
its resident memory grows by less than 10% between the two.

Both run on 127.0.0.1 against the real CPU engine with the tiny model; every
loop is bounded by a request count or a deadline. The measured figures are
printed and written as JSON next to the stack logs (`load.json`, `soak.json`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

from tests.e2e.conftest import TEXT_MODEL
from tests.e2e.traffic import CHAT_PATH, chat_body, metric_samples, sse_data
from tests.stack import Stack, engine_gauge

LOAD_CLIENTS = 200
LOAD_DURATION_S = 60.0
LOAD_MAX_TOKENS = 24
# A request that takes longer than this counts as hung.
CLIENT_TIMEOUT_S = 60.0
# 200 clients against 32 slots and 64 places in the queue: the rest get 429 at
# once, and with a one-second queue timeout the tail of the queue gets 503.
CONCURRENCY_LIMIT = 32
OVERLOAD_ENV = {"MAX_CONCURRENT_REQUESTS": str(CONCURRENCY_LIMIT), "MAX_QUEUE": "64", "QUEUE_TIMEOUT_S": "1"}
REFUSALS = {429: "queue_full", 503: "queue_timeout"}

SOAK_CONCURRENCY = 24
SOAK_WARMUP_REQUESTS = 1_000
SOAK_REQUESTS = 10_000
# Every tenth soak request streams, so both relay paths are exercised.
SOAK_STREAM_EVERY = 10
SOAK_TIME_LIMIT_S = 240.0
MAX_RSS_GROWTH = 0.10
IDLE_WAIT_S = 15.0


def stream_problem(raw: bytes, body: dict[str, object]) -> str | None:
    """What is wrong with a chat completion stream, or None when it is well formed.

    The tiny model's tokens are random bytes, so a token's text can be empty: the
    token count is checked through the usage chunk, when the client asked for one.
    """
    events = sse_data(raw)
    if not events or events[-1] != "[DONE]":
        return "stream does not end with [DONE]"
    try:
        chunks = [json.loads(event) for event in events[:-1]]
    except ValueError:
        return "a data line is not JSON"
    if any("error" in chunk for chunk in chunks):
        return "error event in stream"
    choices = [chunk["choices"][0] for chunk in chunks if chunk.get("choices")]
    if not choices or choices[0]["delta"].get("role") != "assistant":
        return "first chunk has no assistant role"
    if not any("content" in choice["delta"] for choice in choices):
        return "stream has no content chunk"
    if choices[-1].get("finish_reason") not in ("length", "stop"):
        return "last chunk has no finish_reason"
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    if "stream_options" not in body:
        return "usage chunk the client did not ask for" if usages else None
    if len(usages) != 1 or usages[0].get("completion_tokens") != body["max_tokens"]:
        return f"usage chunk missing or wrong: {usages}"
    return None


def completion_problem(raw: bytes, body: dict[str, object]) -> str | None:
    """What is wrong with a non-streaming chat completion, or None when it is well formed."""
    try:
        reply = json.loads(raw)
        message, usage = reply["choices"][0]["message"], reply["usage"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "not a chat completion"
    if message.get("role") != "assistant" or usage.get("completion_tokens") != body["max_tokens"]:
        return "wrong role or token count"
    return None


def refusal_problem(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """What is wrong with a 429/503 refusal, or None when it is the documented one."""
    retry_after = headers.get("Retry-After", "")
    if not retry_after.isdigit() or int(retry_after) < 1:
        return f"{status} without a Retry-After of at least 1 s"
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an OpenAI error body"
    if error.get("code") != REFUSALS[status] or not error.get("message") or not error.get("type"):
        return f"{status} with an unexpected error body: {error}"
    return None


@dataclass
class Outcomes:
    """Counts of every way a request ended, and a few examples of failures."""

    counts: Counter[str] = field(default_factory=Counter)
    failure_examples: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if outcome.startswith("failed") and len(self.failure_examples) < 10:
            self.failure_examples.append(f"{outcome}: {detail}"[:500])

    @property
    def failures(self) -> int:
        return sum(count for outcome, count in self.counts.items() if outcome.startswith("failed"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def send_chat(session: aiohttp.ClientSession, url: str, body: dict[str, object], outcomes: Outcomes) -> float:
    """Send one chat request, read it to the end and record how it ended; returns the Retry-After to honour."""
    try:
        async with session.post(url, json=body) as response:
            raw = await response.read()
            if response.status in REFUSALS:
                problem = refusal_problem(response.status, response.headers, raw)
                if problem:
                    outcomes.add("failed: malformed refusal", problem)
                    return 0.0
                outcomes.add(f"rejected_{response.status}")
                return float(response.headers["Retry-After"])
            if response.status != 200:
                outcomes.add(f"failed: HTTP {response.status}", raw.decode(errors="replace"))
                return 0.0
            problem = stream_problem(raw, body) if body["stream"] else completion_problem(raw, body)
            if problem:
                outcomes.add("failed: malformed answer", f"{problem}: {raw[-300:]!r}")
            else:
                outcomes.add("completed")
    except TimeoutError:
        outcomes.add("failed: no answer within the client timeout", f"{CLIENT_TIMEOUT_S:g}s")
    except aiohttp.ClientError as error:
        outcomes.add("failed: connection error", repr(error))
    return 0.0


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    )


def wrapper_series(base_url: str, *names: str) -> dict[str, float]:
    """The values of unlabelled series of the wrapper's /metrics."""
    samples = metric_samples(httpx.get(f"{base_url}/metrics", timeout=10).text)
    return {name: value for name, value in samples.items() if name in names}


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def write_report(logs_dir: Path, name: str, report: dict[str, object]) -> None:
    path = logs_dir / name
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{name} ({path}):\n{json.dumps(report, indent=2)}")


# --- Load --------------------------------------------------------------------------


async def overload(url: str) -> tuple[Outcomes, float]:
    """LOAD_CLIENTS streaming clients, each sending requests back to back until LOAD_DURATION_S is up.

    Half of the clients ask for the usage chunk (it must carry the token count),
    half do not (it must not appear).
    """
    outcomes = Outcomes()
    started = time.monotonic()
    deadline = started + LOAD_DURATION_S

    async def streaming_client(session: aiohttp.ClientSession, usage: bool) -> None:
        body = chat_body(LOAD_MAX_TOKENS, stream=True, usage=usage)
        while time.monotonic() < deadline:
            retry_after = await send_chat(session, url, body, outcomes)
            # A well-behaved client honours Retry-After (never past the end of the run).
            await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))

    async with client_session() as session:
        clients = [streaming_client(session, usage=index % 2 == 0) for index in range(LOAD_CLIENTS)]
        await asyncio.wait_for(asyncio.gather(*clients), LOAD_DURATION_S + CLIENT_TIMEOUT_S + 30)
    return outcomes, time.monotonic() - started


async def burst(url: str, count: int) -> Outcomes:
    """`count` short non-streaming requests at once."""
    outcomes = Outcomes()
    async with client_session() as session:
        await asyncio.gather(*(send_chat(session, url, chat_body(4, stream=False), outcomes) for _ in range(count)))
    return outcomes


def test_200_streaming_clients_get_a_complete_stream_or_a_documented_refusal(
    text_stack: Stack, wrapper, logs_dir: Path
) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, **OVERLOAD_ENV)
    url = gateway.base_url + CHAT_PATH

    outcomes, elapsed = asyncio.run(overload(url))

    engine_idle = wait_until(lambda: engine_gauge(text_stack.engine_url, "vllm:num_requests_running") == 0, IDLE_WAIT_S)
    gauges = wrapper_series(gateway.base_url, "vllm_api_requests_in_flight", "vllm_api_queue_depth")
    health = httpx.get(f"{gateway.base_url}/health", timeout=10).status_code
    # Every slot came back: a full set of MAX_CONCURRENT_REQUESTS is admitted without queueing.
    queued_before = wrapper_series(gateway.base_url, "vllm_api_queue_wait_seconds_count")
    refill = asyncio.run(burst(url, CONCURRENCY_LIMIT))
    queued_after = wrapper_series(gateway.base_url, "vllm_api_queue_wait_seconds_count")
    report = {
        "clients": LOAD_CLIENTS,
        "duration_s": round(elapsed, 1),
        "settings": OVERLOAD_ENV,
        "max_tokens": LOAD_MAX_TOKENS,
        "requests": outcomes.total,
        "outcomes": dict(outcomes.counts),
        "completed_per_s": round(outcomes.counts["completed"] / elapsed, 1),
        "failure_examples": outcomes.failure_examples,
        "wrapper_gauges_after": gauges,
    }
    write_report(logs_dir, "load.json", report)

    assert outcomes.failures == 0, report
    assert set(outcomes.counts) <= {"completed", "rejected_429", "rejected_503"}, report
    assert outcomes.counts["completed"] >= LOAD_CLIENTS, report
    assert outcomes.counts["rejected_429"] > 0, "200 clients never overflowed a queue of 64"
    assert health == 200
    assert gauges == {"vllm_api_requests_in_flight": 0.0, "vllm_api_queue_depth": 0.0}
    assert engine_idle, "the engine still runs requests after every client got its answer"
    assert refill.counts == {"completed": CONCURRENCY_LIMIT}, refill
    assert queued_after == queued_before, "after the load, fewer than MAX_CONCURRENT_REQUESTS slots are free"


# --- Soak --------------------------------------------------------------------------


def wrapper_process(stack: Stack) -> psutil.Process:
    """The `app.serve` process: the one that relays every request."""
    serving = [process for process in stack.descendants() if "app.serve" in process.cmdline()]
    assert len(serving) == 1, [process.cmdline() for process in stack.descendants()]
    return serving[0]


async def steady_traffic(url: str, count: int, outcomes: Outcomes, deadline: float) -> None:
    """`count` requests from SOAK_CONCURRENCY clients; one in SOAK_STREAM_EVERY streams, half of those with usage."""
    numbers = iter(range(count))

    async def client(session: aiohttp.ClientSession) -> None:
        for number in numbers:
            if time.monotonic() > deadline:
                return
            stream = number % SOAK_STREAM_EVERY == 0
            usage = number % (2 * SOAK_STREAM_EVERY) == 0
            await send_chat(session, url, chat_body(4 if stream else 1, stream, usage), outcomes)

    async with client_session() as session:
        await asyncio.gather(*(client(session) for _ in range(SOAK_CONCURRENCY)))


def test_wrapper_memory_stays_flat_over_10000_requests(text_stack: Stack, wrapper, logs_dir: Path) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL)
    url = gateway.base_url + CHAT_PATH
    serving = wrapper_process(gateway)
    outcomes = Outcomes()
    deadline = time.monotonic() + SOAK_TIME_LIMIT_S

    asyncio.run(steady_traffic(url, SOAK_WARMUP_REQUESTS, outcomes, deadline))
    rss_start = serving.memory_info().rss
    started = time.monotonic()
    asyncio.run(steady_traffic(url, SOAK_REQUESTS, outcomes, deadline))
    elapsed = time.monotonic() - started
    rss_end = serving.memory_info().rss

    growth = (rss_end - rss_start) / rss_start
    report = {
        "requests": outcomes.total,
        "measured_requests": SOAK_REQUESTS,
        "concurrency": SOAK_CONCURRENCY,
        "streaming_share": 1 / SOAK_STREAM_EVERY,
        "outcomes": dict(outcomes.counts),
        "failure_examples": outcomes.failure_examples,
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth_percent": round(100 * growth, 2),
        "total_time_s": round(elapsed, 1),
        "requests_per_s": round(SOAK_REQUESTS / elapsed, 1),
    }
    write_report(logs_dir, "soak.json", report)

    assert outcomes.total == SOAK_WARMUP_REQUESTS + SOAK_REQUESTS, (
        f"only {outcomes.total} requests in {SOAK_TIME_LIMIT_S:g}s: {report}"
    )
    assert outcomes.counts["completed"] == outcomes.total, report
    assert growth < MAX_RSS_GROWTH, report
