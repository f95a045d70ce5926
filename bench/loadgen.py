"""Load generator: closed-loop concurrent clients of an OpenAI-compatible endpoint.

Each "cell" runs `concurrency` clients that send the same request back to back
for a fixed time and measures what a user of the gateway sees: time to first
token, the gap between SSE chunks, total latency (p50/p95/p99), chunks/s,
requests/s and errors. Only chunks and requests that arrive inside the
measurement window (after a warm-up) are counted, so long streams cut by the
window edges do not skew the rates.

It shares a 2-core machine with the gateway under test, so it is built to be
cheap per chunk: aiohttp on uvloop, a pre-serialized request body, and chunks
counted with `bytes.count` on each network read rather than parsed. It runs in
worker processes pinned to the client core (`LoadGenerator`), possibly several
that start on a common clock and whose samples are merged.

Run: `python -m bench.loadgen --url http://127.0.0.1:8500 --concurrency 1,8,64 [--no-stream]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from types import TracebackType
from typing import Self

import aiohttp
import numpy as np
import uvloop

EVENT = b"data: {"  # one SSE event carrying JSON: a token chunk or the usage chunk
USAGE_EVENT = b'"choices":[],"usage"'  # vLLM's final usage chunk (stream_options.include_usage)
DONE = b"data: [DONE]\n\n"
TAIL = max(len(DONE), len(USAGE_EVENT))  # bytes kept between reads so patterns split across reads are still found
PERCENTILES = (50, 95, 99)
START_DELAY_S = 0.3  # lets every worker process reach the common start time


@dataclass(frozen=True, slots=True)
class Cell:
    """One measurement: a request shape sent by `concurrency` clients for `duration_s`."""

    url: str  # base URL, e.g. http://127.0.0.1:8500
    path: str = "/v1/chat/completions"
    stream: bool = True
    concurrency: int = 1
    duration_s: float = 2.0
    warmup_s: float = 0.5
    max_tokens: int | None = None  # None: the server's default length
    include_usage: bool = True
    extra: dict[str, object] = field(default_factory=dict)  # more request fields, e.g. ignore_eos
    model: str = "m"
    timeout_s: float = 120.0

    def body(self) -> bytes:
        payload: dict[str, object] = {"model": self.model, "stream": self.stream}
        if self.path.endswith("/chat/completions"):
            payload["messages"] = [{"role": "user", "content": "Say x as often as you can."}]
        else:
            payload["prompt"] = "Say x as often as you can."
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        if self.stream and self.include_usage:
            payload["stream_options"] = {"include_usage": True}
        payload.update(self.extra)
        return json.dumps(payload).encode()


@dataclass(slots=True)
class Samples:
    """Raw measurements of one cell (from one or more client processes)."""

    window_s: float
    requests: int = 0  # requests completed without error inside the window
    chunks: int = 0  # token chunks (SSE events without the usage chunk) received inside the window
    errors: Counter[str] = field(default_factory=Counter)  # error kind -> count, whole run
    stream_chunks: Counter[int] = field(default_factory=Counter)  # token chunks per completed stream -> streams
    ttft_s: list[float] = field(default_factory=list)
    gap_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)

    def merge(self, other: Samples) -> Samples:
        """Samples of two client processes that measured the same window."""
        return Samples(
            window_s=max(self.window_s, other.window_s),
            requests=self.requests + other.requests,
            chunks=self.chunks + other.chunks,
            errors=self.errors + other.errors,
            stream_chunks=self.stream_chunks + other.stream_chunks,
            ttft_s=self.ttft_s + other.ttft_s,
            gap_s=self.gap_s + other.gap_s,
            latency_s=self.latency_s + other.latency_s,
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between closest ranks); None without values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(samples: Samples) -> dict[str, float | int | None]:
    """Rates, error count and latency percentiles (in ms) of one cell."""
    window = samples.window_s
    summary: dict[str, float | int | None] = {
        "requests_per_s": samples.requests / window,
        "chunks_per_s": samples.chunks / window,
        "errors": sum(samples.errors.values()),
        "requests": samples.requests,
    }
    for name, values in (("ttft", samples.ttft_s), ("gap", samples.gap_s), ("latency", samples.latency_s)):
        for q in PERCENTILES:
            value = percentile(values, q)
            summary[f"{name}_ms_p{q}"] = None if value is None else value * 1000.0
    return summary


class _Window:
    """The measurement window on the monotonic clock, shared by every client of a cell."""

    __slots__ = ("end", "start")

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end


async def _client(session: aiohttp.ClientSession, cell: Cell, window: _Window, out: Samples) -> None:
    """One closed-loop client: sends requests until the window closes, records each one."""
    url = cell.url.rstrip("/") + cell.path
    body = cell.body()
    headers = {"Content-Type": "application/json"}
    stream = cell.stream
    monotonic = time.monotonic
    while True:
        sent = monotonic()
        if sent >= window.end:
            return
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    out.errors[f"HTTP {resp.status}"] += 1
                    continue
                if not stream:
                    await resp.read()
                    done_at = monotonic()
                    if window.start <= done_at <= window.end:
                        out.requests += 1
                    if sent >= window.start and done_at <= window.end:
                        out.latency_s.append(done_at - sent)
                    continue
                await _read_stream(resp, sent, window, out)
        except (TimeoutError, aiohttp.ClientError) as exc:
            out.errors[type(exc).__name__] += 1


async def _read_stream(resp: aiohttp.ClientResponse, sent: float, window: _Window, out: Samples) -> None:
    """Count the SSE events of one stream as they arrive; timings go to `out`."""
    monotonic = time.monotonic
    in_window = sent >= window.start
    gaps: list[float] = []
    first_at = last_at = 0.0
    events = usage = 0
    tail = b""
    readany = resp.content.readany
    while data := await readany():
        now = monotonic()
        buf = tail + data
        # Patterns wholly inside `tail` were counted on the previous read.
        n = buf.count(EVENT) - tail.count(EVENT)
        # The usage chunk's marker may end in a later read than its "data: {".
        n_usage = buf.count(USAGE_EVENT) - tail.count(USAGE_EVENT)
        if n:
            if events == 0:
                first_at = now
            else:
                gaps.append(now - last_at)
            if n > 1:
                gaps.extend(repeat(0.0, n - 1))  # events that arrived in the same read
            last_at = now
            events += n
        if (n or n_usage) and window.start <= now <= window.end:
            out.chunks += n - n_usage
        usage += n_usage
        tail = buf[-TAIL:]
    done_at = monotonic()
    if not tail.endswith(DONE):
        out.errors["stream ended without [DONE]"] += 1
        return
    tokens = events - usage
    out.stream_chunks[tokens] += 1
    if window.start <= done_at <= window.end:
        out.requests += 1
    if in_window and done_at <= window.end:
        if events:
            out.ttft_s.append(first_at - sent)
        out.gap_s.extend(gaps)
        out.latency_s.append(done_at - sent)


async def measure(cell: Cell, start_at: float | None = None) -> Samples:
    """Run one cell in the current event loop; `start_at` (monotonic clock) aligns several processes."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cell.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        begin = time.monotonic() if start_at is None else start_at
        if begin > time.monotonic():
            await asyncio.sleep(begin - time.monotonic())
        window = _Window(begin + cell.warmup_s, begin + cell.warmup_s + cell.duration_s)
        out = Samples(window_s=cell.duration_s)
        await asyncio.gather(*(_client(session, cell, window, out) for _ in range(cell.concurrency)))
    return out


def run_cell(cell: Cell, start_at: float | None = None) -> Samples:
    """Run one cell on a fresh uvloop event loop (the entry point of a worker process)."""
    return uvloop.run(measure(cell, start_at))


def _pin(cpus: frozenset[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def split(concurrency: int, processes: int) -> list[int]:
    """Clients per process: as even as possible, no process without clients."""
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    return [share for share in shares if share > 0]


class LoadGenerator:
    """Worker processes pinned to `cpus` that run cells and merge their samples."""

    def __init__(self, processes: int = 1, cpus: Iterable[int] | None = None) -> None:
        self._processes = processes
        self._cpus = frozenset(cpus) if cpus is not None else None
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Self:
        self._pool = ProcessPoolExecutor(
            max_workers=self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_pin,
            initargs=(self._cpus,),
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is None:
            return
        if exc_type is not None:
            # Interrupted mid-cell: the workers may be inside a long cell, so end them now.
            for process in list((self._pool._processes or {}).values()):
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def start(self, cell: Cell) -> RunningCell:
        """Start a cell in the worker processes; the caller can watch its window, then take the result."""
        if self._pool is None:
            raise RuntimeError("LoadGenerator.start() needs the `with LoadGenerator(...)` block")
        start_at = time.monotonic() + START_DELAY_S
        shares = split(cell.concurrency, self._processes)
        futures = [self._pool.submit(run_cell, replace(cell, concurrency=share), start_at) for share in shares]
        window_start = start_at + cell.warmup_s
        return RunningCell(window_start, window_start + cell.duration_s, futures)

    def run(self, cell: Cell) -> Samples:
        return self.start(cell).result()


@dataclass(frozen=True, slots=True)
class RunningCell:
    window_start: float  # monotonic clock
    window_end: float
    futures: list[Future[Samples]]

    def result(self) -> Samples:
        """Wait for every worker process and merge their samples."""
        results = [future.result() for future in self.futures]
        merged = results[0]
        for result in results[1:]:
            merged = merged.merge(result)
        return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the endpoint, e.g. http://127.0.0.1:8500")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--model", default="m")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--cpus", default="", help="comma-separated cores for the clients (default: any)")
    args = parser.parse_args(argv)
    cpus = [int(c) for c in args.cpus.split(",") if c] or None
    with LoadGenerator(args.processes, cpus) as generator:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            cell = Cell(url=args.url, path=args.path, stream=args.stream, concurrency=concurrency,
                        duration_s=args.duration, warmup_s=args.warmup, max_tokens=args.max_tokens,
                        model=args.model)
            samples = generator.run(cell)
            print(json.dumps({"concurrency": concurrency, **summarize(samples),
                              "error_kinds": dict(samples.errors)}), flush=True)


if __name__ == "__main__":
    main()
