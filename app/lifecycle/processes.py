"""Child processes of the supervisor: the engine and the wrapper workers.

Each child runs in its own process group, so stopping it also stops whatever
it spawned (vLLM starts an engine-core process of its own), and receives
SIGTERM if the supervisor itself dies, so no process of the stack outlives
it. The engine's output is forwarded as JSON log records, and its last lines
are kept to explain a failure.

The output is read in chunks until EOF, whatever it holds: a reader that
stopped (asyncio's `readline` raises on a line over 64 KiB) would leave the
pipe full, and the engine would block on its next log write while still
looking alive. Lines are split here, and each is cut at `MAX_LINE_BYTES` with
a visible marker, so one huge line costs neither memory nor a stalled engine.

A child can get a private directory for its lifetime (`private_dir_env`): vLLM
puts its inter-process sockets in one, and an engine that is killed, or whose
engine-core process is still closing when its group is killed, cannot remove
them. Without it, every engine restart or model swap would leave them behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.observability.logging import log_engine_line

log = logging.getLogger("app.lifecycle")
PR_SET_PDEATHSIG = 1
TAIL_LINES = 200
READ_CHUNK_BYTES = 64 * 1024
# Keeps vLLM's longest ordinary line (its configuration dump) whole.
MAX_LINE_BYTES = 16 * 1024
EXIT_POLL_S = 0.1
# How long an exited process's remaining output may take to be forwarded.
OUTPUT_DRAIN_S = 2.0


def die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ChildProcess:
    """One child in its own process group.

    `private_dir_env`: an environment variable that, unless `env` already sets it,
    names a new directory that is removed once `kill` (the end of `stop`) is done.
    """

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], capture_output: bool,
        private_dir_env: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.capture_output = capture_output
        self.private_dir_env = private_dir_env
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._private_dir: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        output = asyncio.subprocess.PIPE if self.capture_output else None
        env = self.env
        if self.private_dir_env is not None and self.private_dir_env not in env:
            self._private_dir = Path(tempfile.mkdtemp(prefix="vllm-ipc-"))  # short: socket paths have 107 bytes
            env = {**env, self.private_dir_env: str(self._private_dir)}
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT if self.capture_output else None,
                preexec_fn=die_with_parent,
            )
        except OSError:
            self._remove_private_dir()
            raise
        log.info("process started", extra={"child": self.name, "pid": self.process.pid})
        if self.capture_output:
            self._reader = asyncio.ensure_future(self._forward_output())

    async def _forward_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        splitter = LineSplitter(MAX_LINE_BYTES)
        while chunk := await self.process.stdout.read(READ_CHUNK_BYTES):
            for line in splitter.feed(chunk):
                self._forward(line)
        for line in splitter.close():
            self._forward(line)

    def _forward(self, line: str) -> None:
        line = line.rstrip()
        if line:
            self.tail.append(line)
            log_engine_line(line, "stdout")

    async def wait(self) -> int:
        """The exit code, once the process exited; its output still in the pipe is forwarded first.

        asyncio's own `wait()` returns only when the output pipe closes too, which
        never happens while a child that outlived the process holds it.
        """
        assert self.process is not None
        while self.process.returncode is None:
            await asyncio.sleep(EXIT_POLL_S)
        if self._reader is not None:
            await asyncio.wait((self._reader,), timeout=OUTPUT_DRAIN_S)
        return self.process.returncode

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
                await asyncio.wait_for(self.wait(), timeout_s)
            except TimeoutError:
                log.warning("process did not stop in time; killing it", extra={"child": self.name, "timeout_s": timeout_s})
        return await self.kill()

    async def kill(self) -> int | None:
        """SIGKILL the process group, including children that outlived the process, and wait for the exit."""
        if self.process is None:
            return None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = await self.wait()
        self._remove_private_dir()
        return code

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


class LineSplitter:
    """Splits a byte stream into text lines, keeping at most `max_line_bytes` of any line.

    The rest of a longer line is dropped as it arrives and counted in a marker
    at the line's end; invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._kept = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[str]:
        """The lines that `data` completes."""
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._keep(data[start:end])
            lines.append(self._take())
            start = end + 1
        self._keep(data[start:])
        return lines

    def close(self) -> list[str]:
        """The last line, when the stream ended without a newline."""
        return [self._take()] if self._kept or self._dropped else []

    def _keep(self, piece: bytes) -> None:
        room = self.max_line_bytes - len(self._kept)
        self._kept += piece[:room]
        self._dropped += max(0, len(piece) - room)

    def _take(self) -> str:
        line = self._kept.decode("utf-8", "replace")
        if self._dropped:
            line += f" [... {self._dropped} more bytes of this line not shown]"
        self._kept.clear()
        self._dropped = 0
        return line


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
