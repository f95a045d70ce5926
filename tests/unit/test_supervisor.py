"""The supervisor kills an engine that stops answering, and warns about a server open to anyone.

The engine here is a small HTTP server in a child process with a child of its
own, so the process group and the stop are real; the vLLM engine itself,
stopped the same way, is tested in tests/e2e/test_resilience.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from app.config import load_settings
from app.lifecycle import supervisor as supervisor_module
from app.lifecycle.processes import ChildProcess
from app.lifecycle.supervisor import Supervisor, warn_if_open

WAIT_S = 60.0

# Answers GET /health with 200 on the port in argv[1]; a grandchild shares its process group.
ENGINE_STAND_IN = """
import subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
print("serving", flush=True)
HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def supervisor_with(session: aiohttp.ClientSession, runtime_dir: Path, health_timeout_s: str) -> Supervisor:
    settings = load_settings({"VLLM_PORT": str(free_port()), "ENGINE_HEALTH_TIMEOUT_S": health_timeout_s})
    supervisor = Supervisor(settings, runtime_dir)
    supervisor.session = session
    return supervisor


async def start_engine(supervisor: Supervisor) -> ChildProcess:
    argv = [sys.executable, "-c", ENGINE_STAND_IN, str(supervisor.settings.VLLM_PORT)]
    engine = ChildProcess("engine", argv, {}, capture_output=True)
    await engine.start()
    assert await supervisor._wait_until_healthy(engine, WAIT_S) == "ready"
    return engine


async def test_an_engine_that_stops_answering_is_killed_with_its_group(
    session: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = supervisor_with(session, tmp_path, health_timeout_s="2")
    engine = await start_engine(supervisor)
    assert engine.pid is not None
    group = [psutil.Process(engine.pid), *psutil.Process(engine.pid).children(recursive=True)]
    assert len(group) == 2
    os.killpg(engine.pid, signal.SIGSTOP)

    sentence = await asyncio.wait_for(supervisor._serve(engine), WAIT_S)

    assert sentence.startswith("The engine stopped answering its health check for ")
    assert "(ENGINE_HEALTH_TIMEOUT_S=2) and was killed." in sentence
    _, alive = psutil.wait_procs(group, timeout=WAIT_S)
    assert not alive
    assert any(record.getMessage().startswith("engine stopped answering") for record in caplog.records)


async def test_an_engine_that_exits_is_reported_even_while_its_child_lives_on(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # The child keeps the engine's output pipe open: the exit alone must be noticed (the watchdog is off).
    supervisor = supervisor_with(session, tmp_path, health_timeout_s="0")
    engine = await start_engine(supervisor)
    assert engine.pid is not None
    child = psutil.Process(engine.pid).children()[0]
    os.kill(engine.pid, signal.SIGKILL)

    sentence = await asyncio.wait_for(supervisor._serve(engine), WAIT_S)

    assert sentence == "Engine was killed by SIGKILL while serving."
    _, alive = psutil.wait_procs([child], timeout=WAIT_S)
    assert not alive, "the engine's child outlived the engine"


@pytest.mark.parametrize(
    ("environ", "warned"),
    [
        ({"HOST": "0.0.0.0"}, True),
        ({"HOST": "::"}, True),
        ({"HOST": "10.1.2.3", "CONVERSATIONS_ENABLED": "false"}, True),
        ({"HOST": "0.0.0.0", "API_KEY": "k1"}, False),
        ({"HOST": "127.0.0.1"}, False),
        ({"HOST": "::1"}, False),
        ({"HOST": "localhost"}, False),
    ],
)
def test_an_open_server_is_warned_about(
    environ: dict[str, str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.lifecycle")
    warn_if_open(load_settings({"PORT": "8123", **environ}))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    if not warned:
        assert warnings == []
        return
    assert len(warnings) == 1
    assert f"HOST={environ['HOST']}" in warnings[0] and "API_KEY" in warnings[0] and "port 8123" in warnings[0]
    assert ("conversations" in warnings[0]) == (environ.get("CONVERSATIONS_ENABLED") != "false")


def test_the_warning_is_logged_at_container_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """main() warns once, before anything starts (logging setup and the lifecycle are left out here)."""

    class NoLifecycle:
        def __init__(self, *_: object) -> None:
            pass

        async def run(self) -> int:
            return 0

    for name in list(os.environ):
        if name.upper() in {"API_KEY", "HOST"}:
            monkeypatch.delenv(name)
    monkeypatch.setattr(supervisor_module, "configure_logging", lambda *_: None)
    monkeypatch.setattr(supervisor_module, "Supervisor", NoLifecycle)
    caplog.set_level(logging.WARNING, logger="app.lifecycle")

    assert supervisor_module.main() == 0

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("HOST=0.0.0.0 with no API_KEY")
