"""The engine's output is read to the end, whatever it writes, so the engine never blocks on its log.

The child here is a real process writing to the real pipe the supervisor reads;
what it writes is what breaks a line reader: a line of megabytes, a long
stretch without a newline, bytes that are not UTF-8.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import pytest

from app.lifecycle.processes import MAX_LINE_BYTES, ChildProcess, LineSplitter

# Far longer than asyncio's 64 KiB readline limit and the pipe's buffer.
HUGE_LINE_BYTES = 8 * 1024 * 1024
LATER_LINES = 2000
EXIT_TIMEOUT_S = 120.0

CHATTY_CHILD = f"""
import sys, time
out = sys.stdout.buffer
out.write(b"first line\\n")
out.write(b"x" * {HUGE_LINE_BYTES} + b"\\n")
out.write(b"no newline for a while " + b"y" * 300_000)
out.flush()
time.sleep(1)
out.write(b" then the end\\n")
out.write(b"invalid utf-8: \\xff\\xfe here\\n")
for index in range({LATER_LINES}):
    out.write(b"later line %d\\n" % index)
out.write(b"last words without a newline")
"""


async def test_the_reader_survives_huge_lines_and_the_child_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    child = ChildProcess("engine", [sys.executable, "-c", CHATTY_CHILD], {}, capture_output=True)
    await child.start()

    code = await asyncio.wait_for(child.wait(), EXIT_TIMEOUT_S)

    assert code == 0
    forwarded = [record.getMessage() for record in caplog.records if record.name == "engine"]
    assert forwarded[0] == "first line"
    huge = forwarded[1]
    assert huge.startswith("x" * 100) and huge.endswith(f"[... {HUGE_LINE_BYTES - MAX_LINE_BYTES} more bytes of this line not shown]")
    assert forwarded[2].startswith("no newline for a while yyy") and "more bytes of this line not shown" in forwarded[2]
    assert forwarded[3] == "invalid utf-8: \ufffd\ufffd here"
    assert forwarded[4:-1] == [f"later line {index}" for index in range(LATER_LINES)]
    assert forwarded[-1] == "last words without a newline"
    assert max(len(line.encode()) for line in child.tail) < MAX_LINE_BYTES + 100
    assert child.tail[-1] == "last words without a newline"


def test_lines_split_across_chunks_are_joined() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\n\nthr") == ["two", ""]
    assert splitter.feed(b"ee") == []
    assert splitter.close() == ["three"]
    assert splitter.close() == []


def test_a_long_line_keeps_its_start_and_counts_what_was_cut() -> None:
    splitter = LineSplitter(max_line_bytes=10)
    assert splitter.feed(b"0123456789abc") == []
    assert splitter.feed(b"def\nnext\n") == ["0123456789 [... 6 more bytes of this line not shown]", "next"]


# Writes into its private directory, leaves a grandchild in its process group, then waits to be killed.
PRIVATE_DIR_CHILD = """
import os, subprocess, sys, time
private = os.environ["IPC_DIR"]
open(os.path.join(private, "socket-of-a-killed-engine"), "w").close()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(private, flush=True)
time.sleep(600)
"""


async def wait_for_first_line(child: ChildProcess) -> str:
    deadline = asyncio.get_running_loop().time() + EXIT_TIMEOUT_S
    while not child.tail:
        assert asyncio.get_running_loop().time() < deadline, "the child printed nothing"
        await asyncio.sleep(0.05)
    return child.tail[0]


async def test_a_private_directory_goes_with_the_killed_child_and_what_it_left_there() -> None:
    child = ChildProcess(
        "engine", [sys.executable, "-c", PRIVATE_DIR_CHILD], {}, capture_output=True, private_dir_env="IPC_DIR"
    )
    await child.start()
    private = Path(await wait_for_first_line(child))
    assert (private / "socket-of-a-killed-engine").exists()

    await asyncio.wait_for(child.kill(), EXIT_TIMEOUT_S)

    assert not private.exists()


async def test_a_directory_the_operator_chose_is_used_and_kept(tmp_path: Path) -> None:
    env = {"IPC_DIR": str(tmp_path)}
    child = ChildProcess(
        "engine", [sys.executable, "-c", PRIVATE_DIR_CHILD], env, capture_output=True, private_dir_env="IPC_DIR"
    )
    await child.start()
    assert await wait_for_first_line(child) == str(tmp_path)

    await asyncio.wait_for(child.kill(), EXIT_TIMEOUT_S)

    assert (tmp_path / "socket-of-a-killed-engine").exists()


async def test_a_child_that_cannot_start_leaves_no_private_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where tempfile makes the private directory
    monkeypatch.setattr(tempfile, "tempdir", None)
    child = ChildProcess("engine", [str(tmp_path / "no-such-program")], {}, capture_output=True, private_dir_env="IPC_DIR")

    with pytest.raises(FileNotFoundError):
        await child.start()

    assert list(tmp_path.iterdir()) == []
