"""Where the wrapper spends its CPU on the hot path, sampled with py-spy under load.

While the load generator drives the wrapper at c=64 (streaming, then
non-streaming), py-spy samples one wrapper worker (pausing it for each sample:
without the pause, stacks read mid-update put samples on the wrong lines) and
writes a flame graph (SVG) and collapsed stacks; the stacks are reduced to the
functions with the most samples (self and inclusive) and to self time per
package (the wrapper's own modules one by one), which the report lists.
Only the thread holding the GIL is sampled (`--gil`): idle helper threads, such
as the conversation store's SQLite thread, would otherwise show as busy. C
frames are included (`--native`), so time in the interpreter (garbage
collection), uvloop, the HTTP parsers and syscalls shows where it is spent.
py-spy runs on the client core, so the sampling does not take the gateway's CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.loadgen import Cell, LoadGenerator
from bench.services import Service

PROFILE_SECONDS = 5
SAMPLE_RATE_HZ = 200
TOP_FUNCTIONS = 25
CONCURRENCY = 64
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def worker_pid(service: Service) -> int:
    """The wrapper worker (`app.serve`) under the supervisor; the root process if there is none."""
    processes = service.processes()
    if not processes:
        raise RuntimeError(f"{service.name} is not running")
    for process in processes:
        if "app.serve" in " ".join(process.cmdline()):
            return process.pid
    return processes[0].pid


def _split(frame: str) -> tuple[str, str]:
    """'name (path/file.py:12)' -> ('name (path/file.py)', 'path/file.py'): samples add up per function."""
    match = FRAME.match(frame)
    return (f"{match['function']} ({match['file']})", match["file"]) if match else (frame, frame)


def _component(file: str) -> str:
    """The wrapper's own modules by file; everything else by package (aiohttp, uvicorn, asyncio, logging...)."""
    if file.startswith("app/"):
        return file
    return file.split("/", 1)[0].removesuffix(".py")


def summarize_stacks(collapsed: str, limit: int = TOP_FUNCTIONS) -> dict[str, object]:
    """From py-spy's raw (collapsed) stacks: sample count, top functions (self and inclusive %), self % by package."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    components: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_split(frame) for frame in stack.split(";")]
        leaf_function, leaf_file = frames[-1]
        self_counts[leaf_function] += count
        components[_component(leaf_file)] += count
        for function in {function for function, _ in frames}:
            total_counts[function] += count
    share = 100.0 / samples if samples else 0.0
    return {
        "samples": samples,
        "top": [{"function": f, "self": n * share, "total": total_counts[f] * share}
                for f, n in self_counts.most_common(limit)],
        "components": [{"component": c, "self": n * share} for c, n in components.most_common(limit)],
    }


def _record(binary: str, pid: int, output: Path, fmt: str, core: int) -> subprocess.Popen[bytes]:
    argv = ["taskset", "-c", str(core), binary, "record", "--pid", str(pid), "--duration", str(PROFILE_SECONDS),
            "--rate", str(SAMPLE_RATE_HZ), "--gil", "--native", "--format", fmt, "--output", str(output)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_wrapper(generator: LoadGenerator, service: Service, directory: Path,
                    client_core: int) -> list[dict[str, object]]:
    """Profile the wrapper during a streaming and a non-streaming c=64 cell; returns one entry per cell."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy`")
    pid = worker_pid(service)
    profiles = []
    for stream in (True, False):
        name = "stream" if stream else "nonstream"
        svg, raw = directory / f"profile-{name}.svg", directory / f"profile-{name}.txt"
        # Two recordings one after the other: py-spy cannot suspend a process that another py-spy holds.
        cell = Cell(url=service.url, stream=stream, concurrency=CONCURRENCY, duration_s=2 * PROFILE_SECONDS + 2.0,
                    warmup_s=0.5)
        running = generator.start(cell)
        try:
            time.sleep(max(0.0, running.window_start - time.monotonic()))
            for output, fmt in ((raw, "raw"), (svg, "flamegraph")):
                recorder = _record(binary, pid, output, fmt, client_core)
                _, stderr = recorder.communicate()
                if recorder.returncode != 0:
                    error = stderr.decode(errors="replace")[-500:]
                    raise RuntimeError(f"py-spy failed ({recorder.returncode}): {error}")
        finally:
            running.result()
        profiles.append({
            "title": f"{'Streaming' if stream else 'Non-streaming'}, c={CONCURRENCY}",
            "svg": svg.name, "collapsed": raw.name, **summarize_stacks(raw.read_text()),
        })
    return profiles
