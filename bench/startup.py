"""The start-up benchmark (`make bench-startup`): how long from `docker run` to the first token, and why.

RunPod bills a worker from its first `/ping` 204 and counts a cold start from
that 204 to the first 200. This benchmark starts the real stack on the tiny
test model, again and again, and times each start from the moment the
process is spawned:

- `/ping` first answered (204), `/ping` 200, and the first token of a
  streamed chat request sent right after the 200;
- the phases the supervisor reports in /health (preflight, downloading,
  loading, warmup);
- what the supervisor itself adds: from the spawn to the engine's spawn
  (its "starting engine" log line), and from the engine's first healthy
  answer to `ready` (the warm-up, and the health poll's delay).

Scenarios, each in one run on the same model and flags:

- `bare`: `python -m vllm.entrypoints.openai.api_server` with the exact
  command line and environment the supervisor gives the engine for the warm
  cache's snapshot; no wrapper, no warm-up.
- `warm`: `scripts/start.sh` with `MODEL_NAME=org/tiny-llama` and a complete
  cache: the model, the engine's own cache (VLLM_CACHE_ROOT) and the full
  flag check's verdict on the volume, as a restart finds them; no Hub request.
- `no-engine-cache`: the same with an empty VLLM_CACHE_ROOT, as every restart
  was while it lived in the container's home directory (a VLLM_CACHE_ROOT
  of its own also keys the flag check's verdict apart: the check runs).
- `cold`: the same with an empty cache: preflight, fit check and download
  from the local Hub double (tests/fakehub.py).
- `precached`: the same with the model placed the way RunPod's cached models
  are (lower-cased folder, no metadata) on a volume.
- `baked` (`--baked IMAGE`): `docker run` of an image built by
  `build_and_push.sh --bake` on the same model.
- `vlm-warmup` and `vlm-no-warmup`: `scripts/start.sh` on the local tiny
  Qwen2-VL directory with WARMUP=true and false. Right after `/ping` 200,
  eleven chat requests with an image each are sent one after the other
  through the wrapper; the first one's latency over the median of the next
  ten says whether the first user request pays for lazy initialisation (1.0:
  it does not). Each request has its own image, none the warm-up's, so that
  vLLM's cache of processed images cannot make any of them cheaper. One
  more request after a pause of PAUSE_S gives the reference: what any
  request pays once the engine sat idle (on the CPU build its threads fall
  asleep), which no warm-up can remove.
- `swap`: `scripts/start.sh` with `MODELS=a=<snapshot>,b=<snapshot>` (the warm
  cache's tiny-llama under two names, so two engines) and
  `MAX_LOADED_MODELS=1`. After `/ping` 200, one streamed request each for a,
  b, then a again: the time to the first token of each is the first load,
  a swap (a's engine stopped, b's started) and a swap back.

`swap` against `warm` says what a swap costs next to a single model's
start: a swap's first token over a warm start's first token from the spawn.

`warm` against `bare` is the supervisor's overhead: the difference and the
ratio of their medians, to `ready` and to the first token (`bare` pays its
lazy initialisation in its first request, `warm` in its warm-up). Every
repeat runs each scenario once, in an order rotated from repeat to repeat,
after one untimed start (`warm`, else the first scenario) that brings
vLLM's files into the page cache and leaves on the volume what an earlier
start would have (the full flag check's verdict, the engine's own cache).
vLLM's CPU build cannot reload its compile cache, so warm and cold compile
caches start alike here; the test stacks run in eager mode, as does this.

Ports: 8600-8699. The scenarios run by default are all but `baked`. Output: a Markdown table on stdout and in
bench/results/startup.md, every start in bench/results/startup.json.

Run: `python -m bench.startup [--repeats N]
[--scenarios bare,warm,no-engine-cache,cold,precached,vlm-warmup,vlm-no-warmup,swap] [--baked IMAGE]`.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from app.config import load_settings
from app.lifecycle.compile_cache import with_compile_cache
from app.lifecycle.engine_args import build_engine_launch
from app.lifecycle.model_source import prepare_model
from app.lifecycle.warmup import IMAGE_SIDE
from app.media import detect_modalities
from tests.fakehub import FakeHub, hub_environment

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
MODEL_DIR = REPO / ".models" / "tiny-llama"
MODEL_ID = "org/tiny-llama"
VLM_DIR = REPO / ".models" / "tiny-qwen2-vl"
PORTS = {"bare": (8600, 8600), "warm": (8610, 8611), "no-engine-cache": (8650, 8651), "cold": (8620, 8621),
         "precached": (8630, 8631), "vlm-warmup": (8660, 8661), "vlm-no-warmup": (8670, 8671),
         "swap": (8680, 8681), "baked": (8640, 8640)}
SWAP_ORDER = ("a", "b", "a")  # the swap scenario's requests: first load, swap, swap back
WARMUP_OF = {"vlm-warmup": "true", "vlm-no-warmup": "false"}  # the WARMUP setting of each VLM scenario
FOLLOWING_REQUESTS = 10  # the first image request after ready is compared with this many after it
PAUSE_S = 5.0  # then one more after this pause: what any request pays after the engine sat idle
# The test stacks' engine settings (tests/stack.py): eager, a 1 GiB KV cache, two threads.
ENGINE_ENV = {
    "DEVICE": "cpu", "ENFORCE_EAGER": "true", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2",
    "MAX_MODEL_LEN": "2048", "LOG_FORMAT": "json", "HOST": "127.0.0.1",
}
READY_TIMEOUT_S = 600.0
POLL_S = 0.05
STOP_TIMEOUT_S = 30.0


@dataclass
class Start:
    scenario: str
    repeat: int
    first_answer_s: float | None = None  # /ping answered at all (204), or /health for bare
    ready_s: float | None = None  # /ping 200, or /health 200 for bare
    first_token_s: float | None = None  # first content chunk of the first request, from the spawn
    first_request_ttft_s: float | None = None  # that request's own time to first token
    phases: dict[str, float] = field(default_factory=dict)
    engine_spawn_s: float | None = None  # supervisor: from the spawn to the engine's spawn
    image_requests_s: list[float] = field(default_factory=list)  # VLM: latencies after ready, in order
    after_pause_s: float | None = None  # VLM: one more image request, PAUSE_S after the others
    swap_ttft_s: list[float] = field(default_factory=list)  # swap: first token of each SWAP_ORDER request
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None


class Stopped(Exception):
    """The benchmark was interrupted."""


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    starts: list[Start] = []
    try:
        with FakeHub({MODEL_ID: MODEL_DIR}) as hub:
            bench = Bench(work, hub, args)
            bench.prepare_warm_cache()
            # One start that is not counted: the first after a while reads vLLM's files from disk, and a
            # `warm` one leaves on the volume what an earlier start would have (the flag check's verdict).
            untimed = "warm" if "warm" in args.scenarios else args.scenarios[0]
            print(f"  {'(untimed)':10}    {describe(bench.run(untimed, 0))}", flush=True)
            for repeat in range(1, args.repeats + 1):
                # Rotated, so that no scenario always follows the same one.
                shift = (repeat - 1) % len(args.scenarios)
                for scenario in args.scenarios[shift:] + args.scenarios[:shift]:
                    start = bench.run(scenario, repeat)
                    starts.append(start)
                    print(f"  {scenario:10} #{repeat}: {describe(start)}", flush=True)
        text = report(starts, args)
        print(text)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "startup.md").write_text(text)
        (RESULTS_DIR / "startup.json").write_text(json.dumps([asdict(s) for s in starts], indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        return 0 if all(start.error is None for start in starts) else 1
    except Stopped:
        print(f"stopped; logs kept in {work}", file=sys.stderr)
        return 130


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default="bare,warm,no-engine-cache,cold,precached,vlm-warmup,vlm-no-warmup,swap",
                        help="comma-separated, run in this order in each repeat")
    parser.add_argument("--baked", metavar="IMAGE", help="also time `docker run` of this baked image")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s] + (["baked"] if args.baked else [])
    unknown = set(args.scenarios) - set(PORTS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


class Bench:
    def __init__(self, work: Path, hub: FakeHub, args: argparse.Namespace) -> None:
        self.work = work
        self.hub = hub
        self.args = args
        self.warm_home = work / "warm-home"

    # --- scenarios ------------------------------------------------------------------
    def prepare_warm_cache(self) -> None:
        """A complete cache of the model, filled by the image's own download path."""
        os.environ.update(hub_environment(self.hub))
        settings = load_settings({**ENGINE_ENV, "MODEL_NAME": MODEL_ID, "HF_HOME": str(self.warm_home),
                                  "CACHE_VOLUMES": str(self.work / "no-volume")})
        self.snapshot = prepare_model(settings, lambda phase: None, lambda progress: None).path

    def run(self, scenario: str, repeat: int) -> Start:
        start = Start(scenario, repeat, load_average=os.getloadavg())
        log = self.work / f"{scenario}-{repeat}.log"
        try:
            if scenario == "bare":
                self._bare(start, log)
            elif scenario == "baked":
                self._baked(start, log)
            elif scenario in WARMUP_OF:
                self._vlm(start, log)
            elif scenario == "swap":
                self._swap(start, log)
            else:
                self._wrapper(start, log)
        except (TimeoutError, RuntimeError, httpx.HTTPError, OSError) as error:
            start.error = f"{type(error).__name__}: {error}"
        return start

    def _bare(self, start: Start, log: Path) -> None:
        port, _ = PORTS["bare"]
        settings = load_settings({**ENGINE_ENV, "MODEL_NAME": MODEL_ID, "VLLM_PORT": str(port),
                                  "HF_HOME": str(self.warm_home), "CACHE_VOLUMES": str(self.work / "no-volume")})
        launch = build_engine_launch(settings, self.snapshot, detect_modalities(self.snapshot))
        launch = with_compile_cache(launch, settings, self.snapshot, self.snapshot.name)  # the wrapper's folder
        with Process(launch.argv, launch.env, log) as process:
            url = f"http://127.0.0.1:{port}"
            start.first_answer_s = wait_for(process, url + "/health", {200, 503}.__contains__)
            start.ready_s = wait_for(process, url + "/health", (200).__eq__)
            first_token(start, url, MODEL_ID, process)

    def _wrapper(self, start: Start, log: Path) -> None:
        port, vllm_port = PORTS[start.scenario]
        env = {**os.environ, **ENGINE_ENV, **hub_environment(self.hub), "MODEL_NAME": MODEL_ID,
               "PORT": str(port), "VLLM_PORT": str(vllm_port), "HF_HUB_OFFLINE": "0", "HF_TOKEN": "",
               "PYTHON": sys.executable}
        home = self.work / f"{start.scenario}-{start.repeat}-home"
        env.update(HF_HOME=str(home), CACHE_VOLUMES=str(self.work / "no-volume"))
        if start.scenario in ("warm", "no-engine-cache"):
            env["HF_HOME"] = str(self.warm_home)
        if start.scenario == "no-engine-cache":
            env["VLLM_CACHE_ROOT"] = str(self.work / f"empty-engine-cache-{start.repeat}")
        elif start.scenario == "precached":
            volume = self.work / f"precached-{start.repeat}-volume"
            place_like_runpod(self.snapshot, volume / "huggingface-cache" / "hub")
            env["CACHE_VOLUMES"] = str(volume)
        self.hub.reset_counters()
        with Process(["bash", str(REPO / "scripts" / "start.sh")], env, log) as process:
            url = f"http://127.0.0.1:{port}"
            start.first_answer_s = wait_for(process, url + "/ping", {200, 204}.__contains__)
            start.ready_s = wait_for(process, url + "/ping", (200).__eq__)
            first_token(start, url, MODEL_ID, process)
            start.phases = httpx.get(url + "/health", timeout=5).json()["phase_seconds"]
            start.engine_spawn_s = seconds_to_log_line(log, "starting engine", process.spawned_wall)
        if start.scenario in ("warm", "no-engine-cache", "precached") and self.hub.total_requests:
            start.error = f"{self.hub.total_requests} Hub requests on a {start.scenario} start"

    def _vlm(self, start: Start, log: Path) -> None:
        port, vllm_port = PORTS[start.scenario]
        env = {**os.environ, **ENGINE_ENV, "MODEL_NAME": str(VLM_DIR), "WARMUP": WARMUP_OF[start.scenario],
               "PORT": str(port), "VLLM_PORT": str(vllm_port), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "",
               "HF_HOME": str(self.work / "vlm-home"), "CACHE_VOLUMES": str(self.work / "no-volume"),
               "PYTHON": sys.executable}
        with Process(["bash", str(REPO / "scripts" / "start.sh")], env, log) as process:
            url = f"http://127.0.0.1:{port}"
            start.first_answer_s = wait_for(process, url + "/ping", {200, 204}.__contains__)
            start.ready_s = wait_for(process, url + "/ping", (200).__eq__)
            with httpx.Client(base_url=url, timeout=120) as client:
                served = client.get("/v1/models").json()["data"][0]["id"]
                for index in range(1 + FOLLOWING_REQUESTS):
                    sent = time.monotonic()
                    client.post("/v1/chat/completions", json=image_request(served, index)).raise_for_status()
                    start.image_requests_s.append(time.monotonic() - sent)
                time.sleep(PAUSE_S)
                sent = time.monotonic()
                client.post("/v1/chat/completions", json=image_request(served, 1 + FOLLOWING_REQUESTS)).raise_for_status()
                start.after_pause_s = time.monotonic() - sent
                start.phases = client.get("/health").json()["phase_seconds"]

    def _swap(self, start: Start, log: Path) -> None:
        port, vllm_port = PORTS["swap"]
        env = {**os.environ, **ENGINE_ENV, "MODEL_NAME": "unused-with-MODELS",
               "MODELS": f"a={self.snapshot},b={self.snapshot}", "MAX_LOADED_MODELS": "1",
               "PORT": str(port), "VLLM_PORT": str(vllm_port), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "",
               "HF_HOME": str(self.warm_home), "CACHE_VOLUMES": str(self.work / "no-volume"),
               "PYTHON": sys.executable}
        with Process(["bash", str(REPO / "scripts" / "start.sh")], env, log) as process:
            url = f"http://127.0.0.1:{port}"
            start.first_answer_s = wait_for(process, url + "/ping", {200, 204}.__contains__)
            start.ready_s = wait_for(process, url + "/ping", (200).__eq__)
            for model in SWAP_ORDER:
                start.swap_ttft_s.append(time_to_first_token(url, model))

    def _baked(self, start: Start, log: Path) -> None:
        port, _ = PORTS["baked"]
        name = f"bench-startup-baked-{os.getpid()}"
        docker = os.environ.get("DOCKER", "docker")
        argv = [docker, "run", "--rm", "--name", name, "--shm-size", "1g", "--publish", f"127.0.0.1:{port}:8000",
                *[item for key, value in ENGINE_ENV.items() if key != "HOST" for item in ("--env", f"{key}={value}")],
                self.args.baked]
        with Process(argv, dict(os.environ), log, stop=[docker, "stop", "--time", "30", name]) as process:
            url = f"http://127.0.0.1:{port}"
            start.first_answer_s = wait_for(process, url + "/ping", {200, 204}.__contains__)
            start.ready_s = wait_for(process, url + "/ping", (200).__eq__)
            served = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            first_token(start, url, served, process)
            start.phases = httpx.get(url + "/health", timeout=5).json()["phase_seconds"]


# --- processes and probes ----------------------------------------------------------------


class Process:
    """A child in its own process group, stopped with everything it started."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, stop: list[str] | None = None) -> None:
        self.argv, self.env, self.log, self.stop_argv = argv, env, log, stop
        self.spawned = 0.0
        self.spawned_wall = 0.0

    def __enter__(self) -> Process:
        self._log = self.log.open("wb")
        self.spawned, self.spawned_wall = time.monotonic(), time.time()
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop_argv:
            subprocess.run(self.stop_argv, capture_output=True, check=False, timeout=STOP_TIMEOUT_S + 10)
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self._log.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.spawned

    def check(self) -> None:
        if (code := self.popen.poll()) is not None:
            raise RuntimeError(f"exited with code {code}; see {self.log}")


def wait_for(process: Process, url: str, accept: object) -> float:
    """Seconds from the spawn until GET url answers a status `accept` takes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            process.check()
            try:
                if accept(client.get(url).status_code):  # type: ignore[operator]
                    return process.elapsed()
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
    raise TimeoutError(f"{url} not as expected after {READY_TIMEOUT_S:g} s")


def first_token(start: Start, url: str, model: str, process: Process) -> None:
    sent = process.elapsed()
    start.first_request_ttft_s = time_to_first_token(url, model)
    start.first_token_s = sent + start.first_request_ttft_s


def time_to_first_token(url: str, model: str) -> float:
    """Seconds from sending a streamed chat request to its first content chunk; the stream is read to its end."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "stream": True}
    sent = time.monotonic()
    ttft: float | None = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=READY_TIMEOUT_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():  # read to the end: the request completes
            if ttft is None and line.startswith("data: {") and '"content"' in line:
                ttft = time.monotonic() - sent
    if ttft is None:
        raise RuntimeError(f"no content from {model}")
    return ttft


def seconds_to_log_line(log: Path, message: str, spawned_wall: float) -> float | None:
    for raw in log.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("message") == message:
            stamp = datetime.datetime.fromisoformat(line["timestamp"]).timestamp()
            return stamp - spawned_wall
    return None


def image_request(model: str, index: int) -> dict[str, object]:
    """A chat request with an image of its own: a colour per index, never the warm-up's image."""
    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (index * 23 % 256, 40, 80)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}


def first_request_ratio(latencies: list[float]) -> float | None:
    """The first request's latency over the median of the ones after it; None without both."""
    if len(latencies) < 2:
        return None
    return latencies[0] / statistics.median(latencies[1:])


def place_like_runpod(snapshot: Path, hub_cache: Path) -> None:
    """The snapshot's files under RunPod's lower-cased folder, without refs/ or trees/."""
    target = hub_cache / "models--org--tiny-llama" / "snapshots" / snapshot.name
    target.mkdir(parents=True)
    for path in snapshot.iterdir():
        shutil.copyfile(path, target / path.name)


# --- the report ------------------------------------------------------------------------


def describe(start: Start) -> str:
    if start.error:
        return f"error: {start.error}"
    if start.image_requests_s:
        first = f"first image request {fmt(first_request_ratio(start.image_requests_s))}× the next"
    elif start.swap_ttft_s:
        first = "first tokens " + ", ".join(f"{model} {fmt(s)} s" for model, s in zip(SWAP_ORDER, start.swap_ttft_s))
    else:
        first = f"first token {fmt(start.first_token_s)} s"
    return f"204 {fmt(start.first_answer_s)} s, 200 {fmt(start.ready_s)} s, {first} (load {start.load_average[0]:.1f})"


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def spread(values: list[float | None], digits: int = 1) -> str:
    present = [v for v in values if v is not None]
    return f"{min(present):.{digits}f}–{max(present):.{digits}f}" if present else "—"


def report(starts: list[Start], args: argparse.Namespace) -> str:
    ok = [s for s in starts if s.error is None]
    by = {name: [s for s in ok if s.scenario == name] for name in args.scenarios}
    loads = [s.load_average[0] for s in starts]
    lines = [
        f"# Start-up benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"`python -m bench.startup --repeats {args.repeats} --scenarios {','.join(args.scenarios)}`: "
        f"tiny-llama (`vlm-*`: tiny Qwen2-VL) on the CPU engine, eager, {os.cpu_count()} cores, "
        f"load average (1 min) at the starts {min(loads):.1f}–{max(loads):.1f}. Seconds from the spawn, "
        "medians (range) over the repeats.",
        "",
        "| scenario | starts | first /ping 204 | /ping 200 (ready) | first token | first request TTFT | "
        "preflight | download | engine load | warm-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, group in by.items():
        phases = {key: median([s.phases.get(key) for s in group]) for key in
                  ("preflight", "downloading", "loading", "warmup")}
        lines.append(
            f"| {name} | {len(group)} | {fmt(median([s.first_answer_s for s in group]))} | "
            f"{fmt(median([s.ready_s for s in group]))} ({spread([s.ready_s for s in group])}) | "
            f"{fmt(median([s.first_token_s for s in group]))} | "
            f"{fmt(median([s.first_request_ttft_s for s in group]), 3)} | "
            + " | ".join(fmt(phases[key], 2) for key in phases) + " |"
        )
    lines += ["", *overhead(by), *first_request_table(by), *swap_table(by)]
    failed = [s for s in starts if s.error]
    if failed:
        lines += ["", "Failed starts: " + "; ".join(f"{s.scenario} #{s.repeat}: {s.error}" for s in failed)]
    return "\n".join(lines) + "\n"


def first_request_table(by: dict[str, list[Start]]) -> list[str]:
    """The first image request after ready against the next ones: medians over the repeats (range)."""
    rows = {name: group for name, group in by.items() if name in WARMUP_OF and group}
    if not rows:
        return []
    lines = [
        "",
        f"First image request after `/ping` 200 against the next {FOLLOWING_REQUESTS} (tiny Qwen2-VL, through the "
        "wrapper), seconds; the ratio is the first over the median of the next ones, per start:",
        "",
        f"| scenario | WARMUP | starts | first request | median of the next {FOLLOWING_REQUESTS} | first / next | "
        f"after a {PAUSE_S:g} s pause / next |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, group in rows.items():
        ratios = [first_request_ratio(s.image_requests_s) for s in group]
        paused = [first_request_ratio([s.after_pause_s, *s.image_requests_s[1:]]) if s.after_pause_s else None
                  for s in group]
        lines.append(
            f"| {name} | {WARMUP_OF[name]} | {len(group)} | "
            f"{fmt(median([s.image_requests_s[0] if s.image_requests_s else None for s in group]), 3)} | "
            f"{fmt(median([statistics.median(s.image_requests_s[1:]) if len(s.image_requests_s) > 1 else None for s in group]), 3)} | "
            f"{fmt(median(ratios))}× ({spread(ratios, 2)}) | {fmt(median(paused))}× ({spread(paused, 2)}) |"
        )
    return lines


def swap_table(by: dict[str, list[Start]]) -> list[str]:
    """Each swap request's first token: medians over the repeats (range), and a swap against a warm start."""
    group = [s for s in by.get("swap") or [] if len(s.swap_ttft_s) == len(SWAP_ORDER)]
    if not group:
        return []
    columns = [[s.swap_ttft_s[index] for s in group] for index in range(len(SWAP_ORDER))]
    lines = [
        "",
        "MODELS=a,b (the same tiny-llama twice, two engines), MAX_LOADED_MODELS=1: seconds from the request to "
        "its first token, medians (range):",
        "",
        "| starts | a, first load | b, swap | a, swap back |",
        "|---|---|---|---|",
        f"| {len(group)} | " + " | ".join(f"{fmt(median(c))} ({spread(c)})" for c in columns) + " |",  # type: ignore[arg-type]
    ]
    warm = median([s.first_token_s for s in by.get("warm") or []])
    swap = median([*columns[1], *columns[2]])  # type: ignore[list-item]
    if warm and swap:
        lines += ["", f"- A swap's first token over a warm single-model start's (from its spawn): {swap / warm:.2f}×."]
    return lines


def overhead(by: dict[str, list[Start]]) -> list[str]:
    bare, warm = by.get("bare") or [], by.get("warm") or []
    if not bare or not warm:
        return []
    out = []
    for label, attr in (("ready", "ready_s"), ("first token", "first_token_s")):
        b, w = median([getattr(s, attr) for s in bare]), median([getattr(s, attr) for s in warm])
        if b and w:
            out.append(f"- Supervisor overhead to {label}: {w - b:+.2f} s ({w / b:.3f}× a bare `vllm serve`).")
    spawn = median([s.engine_spawn_s for s in warm])
    warmup = median([s.phases.get("warmup") for s in warm])
    if spawn is not None:
        out.append(f"- From the spawn to the engine's spawn (settings, cache look-up, fit check): {spawn:.2f} s.")
    if warmup is not None:
        out.append(f"- Warm-up, between the engine's first healthy answer and `ready`: {warmup:.2f} s.")
    return out


if __name__ == "__main__":
    sys.exit(main())
