"""Start, probe and stop the benchmark's server processes, leaving nothing behind.

Every server (fake upstream, nginx, vllm-router, pass-throughs, the wrapper,
the engine) runs in its own session (process group), optionally pinned to
cores with `taskset`, so that stopping it reaches every child and a Ctrl-C in
the terminal reaches only the benchmark runner, which then stops them in
order. Some servers put their children in sessions of their own (the
wrapper's supervisor does, for each worker and the engine): a server's
processes are therefore its descendants, whatever their process group, both
for CPU accounting and for stopping. `Services` is an ExitStack: whatever was
started is stopped when the block ends, by an error, Ctrl-C or SIGTERM alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STOP_TIMEOUT_S = 15.0
POLL_S = 0.1
LOG_TAIL_LINES = 15


class ServiceError(RuntimeError):
    """A server did not start; the message says which, why, and where its log is."""


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    cpus: str | None = None  # taskset core list, e.g. "0"; None: any core
    env: dict[str, str] | None = None  # None: inherit the runner's environment
    health_path: str = "/health"
    ready_timeout_s: float = 60.0
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if _port_in_use(self.port):
            raise ServiceError(
                f"{self.name}: port {self.port} is already in use; stop whatever listens there "
                f"(`ss -ltnp 'sport = :{self.port}'`) and run the benchmark again"
            )
        argv = (["taskset", "-c", self.cpus] if self.cpus else []) + self.argv
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Poll the health route until it answers 200; fail early if the process exits."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServiceError(f"{self.name} exited with code {code} before it was ready.\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_S)
        raise ServiceError(
            f"{self.name} did not answer 200 on {self.url}{self.health_path} within {self.ready_timeout_s:g}s.\n"
            f"{self._log_tail()}"
        )

    def check_alive(self) -> None:
        """Raise if the server has exited (a crash under load must not pass as a slow gateway)."""
        if self.process is not None and (code := self.process.poll()) is not None:
            raise ServiceError(f"{self.name} exited with code {code} under load.\n{self._log_tail()}")

    def processes(self) -> list[psutil.Process]:
        """The server process and all its descendants, in any process group (for CPU accounting)."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM to the whole process group, then to descendants in other groups that outlived it,
        SIGKILL to whatever is left after STOP_TIMEOUT_S.

        The server stops its own children first where it does (the wrapper's supervisor drains
        its workers); what it leaves behind is stopped here.
        """
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        tree = self.processes()[1:]
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _group_alive(pgid):
            self.process.poll()
            time.sleep(POLL_S)
        left = _running(tree)
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        while time.monotonic() < deadline and (left := _running(left)):
            time.sleep(POLL_S)
        _signal_group(pgid, signal.SIGKILL)
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()
        self.process = None

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                lines = deque(log, maxlen=LOG_TAIL_LINES)
        except OSError:
            return f"(no log at {self.log_path})"
        text = b"".join(lines).decode("utf-8", "replace")
        return f"Last lines of {self.log_path}:\n{text}"


class Services(contextlib.ExitStack):
    """Servers that are stopped, last started first, when the `with` block ends."""

    def start(self, *services: Service) -> None:
        """Start all, then wait until each is ready (they load in parallel)."""
        for service in services:
            service.start()
            self.callback(service.stop)
        for service in services:
            service.wait_ready()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those not yet ended (zombies are ended); psutil checks start times, so a reused pid is not ours."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def raise_on_stop_signals() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt: `with Services()` blocks unwind and stop their servers.

    SIGINT is set explicitly: a process started in the background by a non-interactive shell inherits it ignored.
    """

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)
