"""The benchmark's Granian candidate: the wrapper's own application served by Granian (`--granian`).

What a user of the benchmark relies on: the cell measures the same
application with the same settings as the wrapper cell (so the figures
compare servers, not configurations), pinned to the gateway core, every
feature on (its JSON request line is written), relaying whole streams and
answers, and its CPU counted over all of its processes (Granian serves from a
worker process under its own).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from bench import machine
from bench.fake_upstream import UpstreamConfig, start_server
from bench.loadgen import Cell, measure
from bench.run import Bench, granian_installed, parse_args, wrapper_env
from bench.services import Services
from tests.unit.test_bench_loadgen import free_port


def test_granian_is_asked_for() -> None:
    assert parse_args(["--quick", "--granian"]).granian
    assert not parse_args(["--quick"]).granian


def test_granian_cell_runs_the_wrapper_app_with_the_wrapper_settings_on_the_gateway_core(tmp_path: Path) -> None:
    plan = parse_args(["--quick", "--granian", "--gateway-core", "1"])
    bench = Bench(plan, tmp_path, generator=None, results=None)  # type: ignore[arg-type]  # servers only

    service = bench.granian("wrapper-granian", 23542)
    expected = wrapper_env(23542, int(service.env["ENGINE_URL"].rsplit(":", 1)[1]), workers=1, model="m",
                           hf_home=tmp_path / "wrapper-granian" / "hf")

    assert service.cpus == "1"
    assert {k: v for k, v in service.env.items() if k in expected} == expected
    assert service.argv[-2:] == ["-m", "bench.granian_wrapper"]


@pytest.mark.skipif(not granian_installed(), reason="granian is not installed (requirements-dev.txt)")
async def test_granian_serves_the_wrapper_with_its_log_line_and_its_cpu_counted(tmp_path: Path) -> None:
    upstream_port = free_port()
    server = await start_server("127.0.0.1", upstream_port, UpstreamConfig())
    plan = parse_args(["--quick", "--granian"])
    bench = Bench(plan, tmp_path, generator=None, results=None)  # type: ignore[arg-type]  # servers only
    service = bench.granian("wrapper-granian", free_port())
    service.env = {**service.env, "ENGINE_URL": f"http://127.0.0.1:{upstream_port}"}
    service.cpus = None  # this test's upstream runs on this process's loop, wherever it is
    async with server:
        with Services() as services:
            await asyncio.to_thread(services.start, service)
            before = machine.snapshot(service.processes())
            stream = await measure(Cell(url=service.url, stream=True, concurrency=2, duration_s=0.5, warmup_s=0.1))
            whole = await measure(Cell(url=service.url, stream=False, concurrency=2, duration_s=0.5, warmup_s=0.1))
            after = machine.snapshot(service.processes())
            pids = {p.pid for p in service.processes()}

    assert not stream.errors and not whole.errors
    assert set(stream.stream_chunks) == {64}  # every stream relayed whole
    assert whole.requests > 0
    assert len(pids) >= 2 and os.getpid() not in pids  # Granian's worker is counted with it
    assert machine.usage(before, after, None)["gateway_cpu"] > 0
    lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("path") == "/v1/chat/completions" and line.get("status") == 200 for line in lines)

