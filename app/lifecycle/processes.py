"""Child processes of the supervisor: the engine and the wrapper workers.

Each child runs in its own process group, so stopping it also stops whatever
it spawned (vLLM starts an engine-core process of its own), and receives
SIGTERM if the supervisor itself dies, so no process of the stack outlives
it. The engine's output is read line by line, forwarded as JSON log records,
and its last lines are kept to explain a failed start.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections import deque
from collections.abc import Mapping, Sequence

from app.observability.logging import log_engine_line

log = logging.getLogger("app.lifecycle")
PR_SET_PDEATHSIG = 1
TAIL_LINES = 200


def die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ChildProcess:
    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], capture_output: bool) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.capture_output = capture_output
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        output = asyncio.subprocess.PIPE if self.capture_output else None
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT if self.capture_output else None,
            preexec_fn=die_with_parent,
        )
        log.info("process started", extra={"child": self.name, "pid": self.process.pid})
        if self.capture_output:
            self._reader = asyncio.ensure_future(self._forward_output())

    async def _forward_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                log_engine_line(line, "stdout")

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._reader is not None:
            await asyncio.wait((self._reader,), timeout=2)
        return code

    def signal(self, signum: int) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout_s`."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("process did not stop in time; killing it", extra={"child": self.name, "timeout_s": timeout_s})
        # Children that outlived their parent are still in the group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return await self.process.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
