"""The benchmark's load generator counts what a user would count: every request, every chunk, every error.

Runs the load generator for about a second against the in-process fake upstream
and checks counts only (no timing thresholds: the machine may be busy).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from bench.fake_upstream import UpstreamConfig, start_server, whole_stream
from bench.loadgen import Cell, Samples, measure, percentile, split, summarize

PORTS = range(8580, 8600)  # inside the benchmark's port range


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


async def serve(config: UpstreamConfig) -> tuple[asyncio.Server, str]:
    port = free_port()
    server = await start_server("127.0.0.1", port, config)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    server, url = await serve(UpstreamConfig())
    async with server:
        yield url


def completed_streams(samples: Samples) -> int:
    return sum(samples.stream_chunks.values())


async def test_every_stream_completes_with_its_64_chunks(upstream: str) -> None:
    samples = await measure(Cell(url=upstream, concurrency=4, duration_s=1.0, warmup_s=0.2))

    assert samples.errors == Counter()
    assert samples.requests > 0
    assert samples.stream_chunks == Counter({64: completed_streams(samples)})
    # Chunks counted in the window never exceed what the completed streams carried plus the ones in flight.
    assert 0 < samples.chunks <= 64 * (completed_streams(samples) + 4)
    # One TTFT and one latency per stream measured inside the window; 65 events (64 tokens + usage) → 64 gaps.
    assert len(samples.ttft_s) == len(samples.latency_s) > 0
    assert len(samples.gap_s) == 64 * len(samples.latency_s)
    assert all(t <= total for t, total in zip(samples.ttft_s, samples.latency_s))


async def test_requested_length_and_no_usage_chunk(upstream: str) -> None:
    cell = Cell(url=upstream, concurrency=2, duration_s=0.5, warmup_s=0.1, max_tokens=7, include_usage=False)
    samples = await measure(cell)

    assert samples.errors == Counter()
    assert samples.stream_chunks == Counter({7: completed_streams(samples)})
    assert len(samples.gap_s) == 6 * len(samples.latency_s)


async def test_legacy_completions_stream(upstream: str) -> None:
    samples = await measure(Cell(url=upstream, path="/v1/completions", concurrency=2, duration_s=0.5, warmup_s=0.1))

    assert samples.errors == Counter()
    assert samples.stream_chunks == Counter({64: completed_streams(samples)})


async def test_non_streaming_requests_are_counted(upstream: str) -> None:
    samples = await measure(Cell(url=upstream, stream=False, concurrency=4, duration_s=1.0, warmup_s=0.2))

    assert samples.errors == Counter()
    assert samples.requests > 0
    assert samples.chunks == 0 and samples.ttft_s == [] and samples.gap_s == []
    assert 0 < len(samples.latency_s) <= samples.requests


async def test_paced_upstream_streams_are_complete() -> None:
    server, url = await serve(UpstreamConfig(tokens=5, delay_s=0.002))
    async with server:
        samples = await measure(Cell(url=url, concurrency=3, duration_s=0.5, warmup_s=0.1))

    assert samples.errors == Counter()
    assert samples.stream_chunks == Counter({5: completed_streams(samples)})
    assert len(samples.gap_s) == 5 * len(samples.latency_s)  # 5 tokens + usage = 6 events → 5 gaps


async def test_http_errors_are_counted_not_measured(upstream: str) -> None:
    samples = await measure(Cell(url=upstream, path="/v1/nothing-here", concurrency=2, duration_s=0.3, warmup_s=0.0))

    assert samples.errors["HTTP 404"] > 0
    assert samples.requests == 0 and samples.latency_s == []


async def test_a_stream_cut_before_done_is_an_error() -> None:
    async def cut_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                     b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(cut_stream, "127.0.0.1", port)
    async with server:
        samples = await measure(Cell(url=f"http://127.0.0.1:{port}", concurrency=1, duration_s=0.3, warmup_s=0.0))

    assert samples.errors["stream ended without [DONE]"] > 0
    assert samples.requests == 0 and samples.stream_chunks == Counter()


async def test_events_split_across_reads_are_counted_once() -> None:
    """A gateway may cut the byte stream anywhere; the counts must not depend on where."""
    answer = whole_stream(True, 3, True, "m")

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length"))
            await reader.readexactly(length)
            for start in range(0, len(answer), 7):
                writer.write(answer[start:start + 7])
                await writer.drain()
                await asyncio.sleep(0.0005)
        writer.close()

    port = free_port()
    server = await asyncio.start_server(dribble, "127.0.0.1", port)
    async with server:
        samples = await measure(Cell(url=f"http://127.0.0.1:{port}", concurrency=2, duration_s=0.5, warmup_s=0.0))

    assert samples.errors == Counter()
    assert samples.stream_chunks == Counter({3: completed_streams(samples)})
    assert len(samples.gap_s) == 3 * len(samples.latency_s)  # 3 tokens + usage → 3 gaps


def test_percentiles_of_a_known_list() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10

    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_summary_rates_and_milliseconds() -> None:
    samples = Samples(window_s=2.0, requests=10, chunks=640, errors=Counter({"HTTP 503": 3}),
                      ttft_s=[0.001, 0.002, 0.003], gap_s=[0.0, 0.004], latency_s=[0.010, 0.020])

    summary = summarize(samples)

    assert summary["requests_per_s"] == 5.0
    assert summary["chunks_per_s"] == 320.0
    assert summary["errors"] == 3
    assert summary["ttft_ms_p50"] == pytest.approx(2.0)
    assert summary["gap_ms_p50"] == pytest.approx(2.0)
    assert summary["latency_ms_p99"] == pytest.approx(19.9)


def test_merged_samples_add_up() -> None:
    a = Samples(window_s=1.0, requests=2, chunks=128, stream_chunks=Counter({64: 2}), latency_s=[0.1, 0.2])
    b = Samples(window_s=1.0, requests=1, chunks=64, errors=Counter({"HTTP 500": 1}), stream_chunks=Counter({64: 1}),
                latency_s=[0.3])

    merged = a.merge(b)

    assert (merged.requests, merged.chunks, merged.window_s) == (3, 192, 1.0)
    assert merged.stream_chunks == Counter({64: 3})
    assert merged.errors == Counter({"HTTP 500": 1})
    assert sorted(merged.latency_s) == [0.1, 0.2, 0.3]


def test_clients_are_split_evenly_over_processes() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(64, 1) == [64]
    assert split(1, 2) == [1]
