"""The benchmark's servers: vLLM's router as the peer, and each server's CPU and stop across process groups.

The wrapper's supervisor starts each worker in a session of its own, so a
server's process group is not all of its processes: its CPU time and its stop
must reach every descendant. The router test runs the real `vllm-router`
(requirements-dev.txt) in front of the fake upstream and checks what a user
of the benchmark relies on: it relays complete streams and JSON answers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import machine
from bench.fake_upstream import UpstreamConfig, start_server
from bench.loadgen import Cell, measure
from bench.run import ROUTER_PORT, parse_args, router_argv, router_binary
from bench.services import Service, Services
from tests.unit.test_bench_loadgen import free_port

WAIT_S = 60.0

# A server whose worker lives in a session of its own, like the wrapper's supervisor and its workers:
# the worker burns CPU_SECONDS of CPU, writes its pid and CPU time to argv[1], then sleeps.
SPAWNER = """
import os, subprocess, sys, time
worker = '''
import os, sys, time
while time.process_time() < {cpu}:
    pass
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(f"{{os.getpid()}} {{time.process_time()}}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
'''
subprocess.Popen([sys.executable, "-c", worker, sys.argv[1]], start_new_session=True)
time.sleep(600)
"""
CPU_SECONDS = 0.3
TICK_S = 0.02  # psutil reads CPU times from /proc in clock ticks (10 ms); the worker measured its own exactly


def wait_for(path: Path) -> str:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written within {WAIT_S:g}s"
        time.sleep(0.05)
    return path.read_text()


@pytest.fixture
def spawner(tmp_path: Path):
    report = tmp_path / "worker"
    service = Service("spawner", [sys.executable, "-c", SPAWNER.format(cpu=CPU_SECONDS), str(report)], 0,
                      tmp_path / "spawner.log")
    service.start()
    try:
        pid_text, cpu_text = wait_for(report).split()
        yield service, psutil.Process(int(pid_text)), float(cpu_text)
    finally:
        service.stop()


def test_cpu_of_a_worker_in_its_own_session_is_the_servers(spawner) -> None:
    service, worker, worker_cpu = spawner
    assert os.getpgid(worker.pid) != os.getpgid(service.process.pid)  # the premise: another process group

    counted = machine.snapshot(service.processes()).gateway_s

    assert worker.pid in {p.pid for p in service.processes()}
    assert worker_cpu >= CPU_SECONDS
    assert counted >= worker_cpu - TICK_S


def test_stop_ends_workers_in_other_sessions(spawner) -> None:
    service, worker, _ = spawner

    service.stop()

    deadline = time.monotonic() + WAIT_S  # a killed process ends once the kernel has delivered the signal
    while ended(worker) is False:
        assert time.monotonic() < deadline, "the worker in its own session outlived the server's stop"
        time.sleep(0.05)


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_router_runs_in_front_of_the_upstream_as_its_readme_says() -> None:
    argv = router_argv(8514, 8500, 8516)

    assert argv[argv.index("--worker-urls") + 1] == "http://127.0.0.1:8500"  # the base URL: it polls /health
    assert argv[argv.index("--policy") + 1] == "round_robin"
    ports = [int(argv[argv.index(flag) + 1]) for flag in ("--port", "--prometheus-port")]
    assert all(8500 <= port <= 8599 for port in ports)  # its metrics server too (default 29000)
    assert 8500 <= ROUTER_PORT <= 8599


def test_compare_takes_a_revision() -> None:
    assert parse_args(["--quick", "--compare", "main"]).compare == "main"
    assert parse_args(["--quick"]).compare is None


@pytest.mark.skipif(router_binary() is None, reason="vllm-router is not installed (requirements-dev.txt)")
async def test_router_relays_whole_streams_and_answers(tmp_path: Path) -> None:
    upstream_port = free_port()
    server = await start_server("127.0.0.1", upstream_port, UpstreamConfig())
    async with server:
        port = free_port()
        with socket.socket() as held:  # two distinct free ports: the router's and its metrics server's
            held.bind(("127.0.0.1", port))
            metrics_port = free_port()
        router = Service("vllm-router", router_argv(port, upstream_port, metrics_port), port,
                         tmp_path / "router.log")
        with Services() as services:
            await asyncio.to_thread(services.start, router)  # it polls the upstream, served on this loop
            stream = await measure(Cell(url=router.url, stream=True, concurrency=2, duration_s=0.5, warmup_s=0.1))
            whole = await measure(Cell(url=router.url, stream=False, concurrency=2, duration_s=0.5, warmup_s=0.1))

    assert not stream.errors and not whole.errors
    assert stream.requests > 0 and whole.requests > 0
    assert set(stream.stream_chunks) == {64}  # every stream relayed whole
