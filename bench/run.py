"""The whole gateway benchmark in one command (`make bench`).

Starts a fake OpenAI-compatible upstream, the baselines (direct access, nginx,
the vLLM project's router `vllm-router`, a minimal FastAPI + aiohttp
pass-through, optionally FastAPI + httpx) and the wrapper (`scripts/start.sh`
with ENGINE_URL, JSON logs to a file), optionally the wrapper as it was at
another commit (`--compare REF`), runs the matrix of cells with the load
generator, stops everything, and writes `bench/results/latest.md`,
`latest.json` and plots.

Placement on the 2-core machine: every gateway is pinned to the gateway core
(0 by default); the upstream, the load generator and this runner share the
other core. In the real-engine cells the engine computes on the first core and the
wrapper runs on the other. Cells run interleaved: each repeat measures every gateway at one
concurrency back to back, so ratios compare measurements taken seconds apart.

Run: `python -m bench.run [--quick] [--engine] [--workers N] [--httpx] [--granian] [--profile] [--compare REF]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, report
from bench.loadgen import Cell, LoadGenerator, summarize
from bench.profile import profile_wrapper, py_spy
from bench.services import Service, ServiceError, Services, raise_on_stop_signals

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PYTHON = sys.executable

# The benchmark's ports: BENCH_PORT_BASE (default 8500) and the 99 above it, so runs on a shared
# machine can be kept apart.
PORT_BASE = int(os.environ.get("BENCH_PORT_BASE", "8500"))
UPSTREAM_PORT = PORT_BASE + 0
DECODE_UPSTREAM_PORT = PORT_BASE + 1
NGINX_PORT = PORT_BASE + 10
NGINX_DECODE_PORT = PORT_BASE + 11
AIOHTTP_PORT = PORT_BASE + 12
HTTPX_PORT = PORT_BASE + 13
ROUTER_PORT = PORT_BASE + 14
ROUTER_DECODE_PORT = PORT_BASE + 15
ROUTER_METRICS_PORT = PORT_BASE + 16
ROUTER_DECODE_METRICS_PORT = PORT_BASE + 17
WRAPPER_PORT = PORT_BASE + 20
WRAPPER_DECODE_PORT = PORT_BASE + 21
WRAPPER_SCALE_ONE_PORT = PORT_BASE + 22
WRAPPER_SCALE_MANY_PORT = PORT_BASE + 23
ENGINE_PORT = PORT_BASE + 30
WRAPPER_ENGINE_PORT = PORT_BASE + 31
COMPARE_PORT = PORT_BASE + 40
COMPARE_DECODE_PORT = PORT_BASE + 41
GRANIAN_PORT = PORT_BASE + 42

TOKENS = 64
DECODE_DELAY_MS = 5.0
DECODE_CONCURRENCY = 64
SCALE_CONCURRENCY = 64
FULL_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 64)
ENGINE_MODEL = REPO / ".models" / "tiny-llama"
ENGINE_CONCURRENCY = (1, 2, 4, 8, 16, 32)
ENGINE_MAX_TOKENS = 64
ENGINE_READY_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    repeats: int
    httpx: bool
    engine: bool
    workers: int | None
    profile: bool
    client_processes: int
    gateway_core: int
    client_core: int
    quick: bool
    granian: bool = False  # the wrapper's app under Granian too (a candidate server)
    compare: str | None = None  # a git revision of the wrapper measured beside the working tree


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One cell of the matrix: a scenario measured through one gateway at one concurrency."""

    scenario: str  # a key of report.RATE_METRIC
    gateway: str  # direct | nginx | vllm-router | aiohttp | httpx | wrapper | wrapper@<REF> | wrapper-granian | wrapper-<N>w
    cell: Cell
    service: Service  # the process tree whose CPU is the gateway's
    pinned: bool  # whether the gateway is pinned to the gateway core


class Bench:
    """Builds the servers for a plan and runs the matrix; one instance per run."""

    def __init__(self, plan: Plan, workdir: Path, generator: LoadGenerator, results: report.Results) -> None:
        self.plan = plan
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.generator = generator
        self.results = results

    # --- servers --------------------------------------------------------------
    def upstream(self, name: str, port: int, delay_ms: float = 0.0) -> Service:
        argv = [PYTHON, "-m", "bench.fake_upstream", "--port", str(port), "--tokens", str(TOKENS),
                "--delay-ms", str(delay_ms)]
        return Service(name, argv, port, self.logs / f"{name}.log", cpus=str(self.plan.client_core), cwd=REPO)

    def nginx(self) -> Service:
        directory = self.workdir / "nginx"
        directory.mkdir(parents=True, exist_ok=True)
        config = (REPO / "bench" / "nginx.conf.template").read_text()
        values = {"DIR": directory, "UPSTREAM_PORT": UPSTREAM_PORT, "DECODE_UPSTREAM_PORT": DECODE_UPSTREAM_PORT,
                  "PORT": NGINX_PORT, "DECODE_PORT": NGINX_DECODE_PORT}
        for key, value in values.items():
            config = config.replace(f"@{key}@", str(value))
        (directory / "nginx.conf").write_text(config)
        argv = [nginx_binary(), "-p", str(directory), "-c", str(directory / "nginx.conf"),
                "-e", str(directory / "error.log")]
        return Service("nginx", argv, NGINX_PORT, self.logs / "nginx.log", cpus=str(self.plan.gateway_core))

    def router(self, name: str, port: int, upstream_port: int, metrics_port: int) -> Service:
        """vLLM's router (Rust), as its README runs it in front of one engine; its metrics stay on."""
        return Service(name, router_argv(port, upstream_port, metrics_port), port, self.logs / f"{name}.log",
                       cpus=str(self.plan.gateway_core))

    def passthrough(self, kind: str, port: int) -> Service:
        argv = [PYTHON, "-m", f"bench.passthrough_{kind}", "--port", str(port),
                "--upstream", f"http://127.0.0.1:{UPSTREAM_PORT}"]
        return Service(f"passthrough-{kind}", argv, port, self.logs / f"passthrough-{kind}.log",
                       cpus=str(self.plan.gateway_core), cwd=REPO)

    def wrapper(self, name: str, port: int, engine_port: int, *, core: int | str | None, workers: int = 1,
                model: str = "m", root: Path = REPO) -> Service:
        """The wrapper as deployed: scripts/start.sh in wrapper-only mode, one JSON log line per request.

        `core`: the core (or taskset list of cores) it is pinned to, or None to let it run on any.
        `root`: the source tree it runs from (another revision's export for `--compare`).
        """
        env = wrapper_env(port, engine_port, workers=workers, model=model, hf_home=self.workdir / name / "hf")
        return Service(name, ["bash", "scripts/start.sh"], port, self.logs / f"{name}.log",
                       cpus=None if core is None else str(core), env=env, cwd=root,
                       ready_timeout_s=ENGINE_READY_TIMEOUT_S)

    def granian(self, name: str, port: int) -> Service:
        """The wrapper's application under Granian (a candidate server, `bench.granian_wrapper`), pinned like the
        wrapper, with the same environment; no supervisor, as Granian would run it."""
        env = {**wrapper_env(port, UPSTREAM_PORT, workers=1, model="m", hf_home=self.workdir / name / "hf"),
               "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        return Service(name, granian_argv(), port, self.logs / f"{name}.log", cpus=str(self.plan.gateway_core),
                       env=env, cwd=REPO, ready_timeout_s=ENGINE_READY_TIMEOUT_S)

    def compared_tree(self, revision: str) -> Path:
        """The wrapper's files at `revision`, exported (`git archive`) into the work directory."""
        directory = self.workdir / "compare"
        directory.mkdir(parents=True, exist_ok=True)
        export_revision(revision, directory)
        return directory

    def engine(self) -> Service:
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
               "VLLM_CPU_KVCACHE_SPACE": "2"}
        argv = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ENGINE_MODEL),
                "--host", "127.0.0.1", "--port", str(ENGINE_PORT), "--enforce-eager", "--max-model-len", "1024"]
        return Service("engine", argv, ENGINE_PORT, self.logs / "engine.log", env=env, cwd=REPO,
                       ready_timeout_s=ENGINE_READY_TIMEOUT_S)

    # --- matrices -------------------------------------------------------------
    def fake_upstream_matrix(self, with_wrapper: bool) -> None:
        """Every cell against the fake upstreams: stream, non-stream, decode, and scale-out when asked."""
        plan = self.plan
        up = self.upstream("upstream", UPSTREAM_PORT)
        decode_up = self.upstream("upstream-decode", DECODE_UPSTREAM_PORT, DECODE_DELAY_MS)
        ngx = self.nginx()
        router = self.router("vllm-router", ROUTER_PORT, UPSTREAM_PORT, ROUTER_METRICS_PORT)
        router_decode = self.router("vllm-router-decode", ROUTER_DECODE_PORT, DECODE_UPSTREAM_PORT,
                                    ROUTER_DECODE_METRICS_PORT)
        gateways = {"direct": up, "nginx": ngx, "vllm-router": router,
                    "aiohttp": self.passthrough("aiohttp", AIOHTTP_PORT)}
        if plan.httpx:
            gateways["httpx"] = self.passthrough("httpx", HTTPX_PORT)
        # nginx serves the decode upstream on its second port: (URL, process tree) per gateway.
        decode = {"direct": (decode_up.url, decode_up), "nginx": (f"http://127.0.0.1:{NGINX_DECODE_PORT}", ngx),
                  "vllm-router": (router_decode.url, router_decode)}
        scale: dict[str, Service] = {}
        servers = [s for s in gateways.values() if s is not up] + [router_decode]
        if with_wrapper:
            core = plan.gateway_core
            gateways["wrapper"] = self.wrapper("wrapper", WRAPPER_PORT, UPSTREAM_PORT, core=core)
            wrapper_decode = self.wrapper("wrapper-decode", WRAPPER_DECODE_PORT, DECODE_UPSTREAM_PORT, core=core)
            decode["wrapper"] = (wrapper_decode.url, wrapper_decode)
            servers += [gateways["wrapper"], wrapper_decode]
            if plan.granian:
                gateways["wrapper-granian"] = self.granian("wrapper-granian", GRANIAN_PORT)
                servers.append(gateways["wrapper-granian"])
            if plan.compare:
                label, tree = f"wrapper@{plan.compare}", self.compared_tree(plan.compare)
                gateways[label] = self.wrapper("wrapper-compare", COMPARE_PORT, UPSTREAM_PORT, core=core, root=tree)
                compare_decode = self.wrapper("wrapper-compare-decode", COMPARE_DECODE_PORT, DECODE_UPSTREAM_PORT,
                                              core=core, root=tree)
                decode[label] = (compare_decode.url, compare_decode)
                servers += [gateways[label], compare_decode]
            if plan.workers:
                # Each pinned: one worker to the gateway core, N workers to N cores (the gateway core first).
                scale = {
                    "wrapper-1w": self.wrapper("wrapper-scale-1", WRAPPER_SCALE_ONE_PORT, UPSTREAM_PORT,
                                               core=core),
                    f"wrapper-{plan.workers}w": self.wrapper(f"wrapper-scale-{plan.workers}",
                                                             WRAPPER_SCALE_MANY_PORT, UPSTREAM_PORT,
                                                             core=scale_cores(core, plan.workers),
                                                             workers=plan.workers),
                }
                servers += scale.values()
        with Services() as services:
            services.start(up, decode_up)
            services.start(*servers)
            jobs: list[Job] = []
            d, w = plan.duration_s, plan.warmup_s
            for stream in (True, False):
                for c in plan.concurrency:
                    for name, service in gateways.items():
                        cell = Cell(url=service.url, stream=stream, concurrency=c, duration_s=d, warmup_s=w)
                        jobs.append(Job("stream" if stream else "nonstream", name, cell, service, name != "direct"))
            for name, (url, service) in decode.items():
                # Streams last 64 x 5 ms: a longer window keeps the chunk rate exact.
                cell = Cell(url=url, stream=True, concurrency=DECODE_CONCURRENCY, duration_s=max(d, 3.0),
                            warmup_s=max(w, 1.0))
                jobs.append(Job("decode", name, cell, service, name != "direct"))
            for stream in (True, False):
                for name, service in scale.items():
                    cell = Cell(url=service.url, stream=stream, concurrency=SCALE_CONCURRENCY, duration_s=d,
                                warmup_s=w)
                    jobs.append(Job("scale-stream" if stream else "scale-nonstream", name, cell, service,
                                    name == "wrapper-1w"))
            self.run_jobs("fake upstream", jobs)
            if plan.profile and with_wrapper:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                try:
                    self.results.profiles = profile_wrapper(self.generator, gateways["wrapper"], RESULTS_DIR,
                                                            plan.client_core)
                except RuntimeError as error:
                    self.results.notes.append(f"No profile: {error}")

    def engine_matrix(self) -> None:
        """Real engine cells.

        vLLM's CPU build binds its compute to the first core and leaves the other to
        its API server; the wrapper is pinned to that other core (with the load
        generator), as on a GPU machine its CPU never comes out of the engine's compute.
        """
        engine = self.engine()
        wrapper = self.wrapper("wrapper-engine", WRAPPER_ENGINE_PORT, ENGINE_PORT, core=self.plan.client_core,
                               model=str(ENGINE_MODEL))
        with Services() as services:
            services.start(engine)
            services.start(wrapper)
            jobs = []
            for c in ENGINE_CONCURRENCY:
                for name, service in (("direct", engine), ("wrapper", wrapper)):
                    cell = Cell(url=service.url, stream=True, concurrency=c, duration_s=max(self.plan.duration_s, 5.0),
                                warmup_s=max(self.plan.warmup_s, 1.0), max_tokens=ENGINE_MAX_TOKENS,
                                extra={"ignore_eos": True}, model=str(ENGINE_MODEL))
                    jobs.append(Job("engine", name, cell, service, False))
            self.run_jobs("engine", jobs)

    def run_jobs(self, matrix: str, jobs: list[Job]) -> None:
        """Each repeat runs every job once; gateways rotate so that none always goes first."""
        total = len(jobs) * self.plan.repeats
        done = 0
        for rep in range(self.plan.repeats):
            self.results.note_load_average(f"{matrix} repeat {rep + 1}", machine.load_average())
            for job in _rotated(jobs, rep):
                running = self.generator.start(job.cell)
                _sleep_until(running.window_start)
                before = machine.snapshot(job.service.processes())
                _sleep_until(running.window_end)
                after = machine.snapshot(job.service.processes())
                samples = running.result()
                job.service.check_alive()
                cpu = machine.usage(before, after, self.plan.gateway_core if job.pinned else None)
                summary = summarize(samples)
                limited_by = machine.bottleneck(cpu, self.plan.client_core, samples.requests,
                                                sum(samples.errors.values()))
                self.results.add(job.scenario, job.gateway, job.cell.concurrency, rep, summary, cpu, limited_by,
                                 dict(samples.errors))
                done += 1
                _progress(done, total, rep, job, summary, cpu)


def _rotated(jobs: list[Job], rep: int) -> list[Job]:
    """Same cells, with the gateway order at each (scenario, concurrency) rotated by the repeat number."""
    groups: dict[tuple[str, int], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.scenario, job.cell.concurrency), []).append(job)
    out: list[Job] = []
    for group in groups.values():
        shift = rep % len(group)
        out.extend(group[shift:] + group[:shift])
    return out


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _progress(done: int, total: int, rep: int, job: Job, summary: dict[str, float | int | None],
              cpu: dict[str, float]) -> None:
    rate = (f"{summary['chunks_per_s']:>9,.0f} chunks/s" if job.cell.stream
            else f"{summary['requests_per_s']:>9,.0f} req/s   ")
    p50 = summary["ttft_ms_p50"] if job.cell.stream else summary["latency_ms_p50"]
    p50_text = "-" if p50 is None else f"{p50:.2f} ms"
    print(f"[{done:>3}/{total}] rep {rep + 1} {job.scenario:<15} c={job.cell.concurrency:<3} {job.gateway:<11} "
          f"{rate}  p50 {p50_text:>9}  gateway cpu {cpu['gateway_cpu']:4.0%}  errors {summary['errors']}",
          flush=True)


# --- command line ---------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small matrix for a smoke test (c=1,64; 1 s cells; 1 repeat)")
    parser.add_argument("--engine", action="store_true",
                        help=f"add the real CPU engine cells ({ENGINE_MODEL.relative_to(REPO)}, c=1..32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="add scale-out cells: the wrapper with WORKERS=N on N cores vs WORKERS=1 on one")
    parser.add_argument("--httpx", action="store_true", help="add the FastAPI + httpx pass-through for reference")
    parser.add_argument("--granian", action="store_true",
                        help="also measure the wrapper's app served by Granian instead of uvicorn (a candidate)")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="also measure the wrapper as it is at git revision REF (e.g. main), in the same cells")
    parser.add_argument("--profile", action="store_true",
                        help="after the matrix, profile the wrapper with py-spy at c=64")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every cell (default 3; quick: 1)")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 2; quick: 1)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of warm-up per cell (default 0.5; quick: 0.3)")
    parser.add_argument("--concurrency", default=None,
                        help="comma-separated client counts (default 1,2,4,8,16,32,64)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load generator processes (all on the client core)")
    parser.add_argument("--gateway-core", type=int, choices=(0, 1), default=0,
                        help="core for the gateways; the other core runs upstream and clients (default 0)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 2:
        parser.error("--workers needs N >= 2 (it is compared with WORKERS=1)")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats needs at least 1")
    default_c = QUICK_CONCURRENCY if args.quick else FULL_CONCURRENCY
    return Plan(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else default_c,
        duration_s=args.duration or (1.0 if args.quick else 2.0),
        warmup_s=args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5),
        repeats=args.repeats or (1 if args.quick else 3),
        httpx=args.httpx,
        engine=args.engine,
        workers=args.workers,
        profile=args.profile,
        client_processes=args.client_processes,
        gateway_core=args.gateway_core,
        client_core=1 - args.gateway_core,
        quick=args.quick,
        compare=args.compare,
        granian=args.granian,
    )


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def scale_cores(first: int, workers: int) -> str:
    """taskset's list for `workers` cores starting at `first` (wrapping around the machine's cores)."""
    count = len(os.sched_getaffinity(0))
    return ",".join(str((first + i) % count) for i in range(min(workers, count)))


def router_binary() -> str | None:
    """vllm-router's launcher beside this Python (requirements-dev.txt), or on PATH."""
    beside = Path(PYTHON).parent / "vllm-router"
    return str(beside) if beside.is_file() else shutil.which("vllm-router")


def router_argv(port: int, upstream_port: int, metrics_port: int) -> list[str]:
    """vllm-router in front of one upstream.

    It waits until `GET /health` answers on each worker before it listens, so the
    worker URL is the upstream's base URL (no /v1). Round robin over one worker is
    its cheapest policy (the default, cache_aware, keeps a prefix tree per request).
    """
    return [router_binary() or "vllm-router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", f"http://127.0.0.1:{upstream_port}", "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]


def wrapper_env(port: int, engine_port: int, *, workers: int, model: str, hf_home: Path) -> dict[str, str]:
    """The wrapper's environment as deployed in wrapper-only mode: every feature on, one JSON log line per request."""
    return {
        "PATH": f"{Path(PYTHON).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHON": PYTHON,
        "ENGINE_URL": f"http://127.0.0.1:{engine_port}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": str(workers),
        "LOG_FORMAT": "json",
        "MODEL_NAME": model,
        "HF_HOME": str(hf_home),
        "DRAIN_TIMEOUT_S": "1",
    }


def granian_installed() -> bool:
    return importlib.util.find_spec("granian") is not None


def granian_argv() -> list[str]:
    """Granian serving the wrapper's app: one worker, one runtime thread (bench.granian_wrapper)."""
    return [PYTHON, "-m", "bench.granian_wrapper"]


def export_revision(revision: str, directory: Path) -> None:
    """The repository's files at `revision` (a commit, branch or tag) into `directory`."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO, capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise ServiceError(f"--compare {revision}: git archive failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)


def wrapper_missing() -> str | None:
    """None when the wrapper can be benchmarked, else what is missing."""
    missing = [p for p in ("scripts/start.sh", "app/main.py") if not (REPO / p).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


def preflight(plan: Plan) -> None:
    """Exit with the fix when something the plan needs is not there."""
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench: needs 2 cores (gateways on one, upstream and clients on the other)")
    if not Path(nginx_binary()).is_file():
        sys.exit("bench: nginx is not installed; install it with `apt-get install -y nginx`")
    if router_binary() is None:
        sys.exit("bench: vllm-router is not installed; install it with `.venv/bin/pip install -r requirements-dev.txt`")
    if plan.compare and subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{plan.compare}^{{commit}}"],
                                       cwd=REPO, capture_output=True, check=False).returncode != 0:
        sys.exit(f"bench: --compare {plan.compare}: no such git revision")
    if plan.granian and not granian_installed():
        sys.exit("bench: --granian needs Granian; install it with `.venv/bin/pip install -r requirements-dev.txt`")
    if plan.profile and py_spy() is None:
        sys.exit("bench: --profile needs py-spy; install it with `.venv/bin/pip install py-spy`")
    missing = wrapper_missing()
    if (plan.engine or plan.workers or plan.profile) and missing:
        sys.exit(f"bench: --engine, --workers and --profile measure the wrapper, which is missing ({missing})")
    if plan.engine and not (ENGINE_MODEL / "config.json").is_file():
        sys.exit(f"bench: --engine needs the tiny model in {ENGINE_MODEL}; build it with "
                 "`.venv/bin/python tools/build_test_models.py`")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    preflight(plan)
    raise_on_stop_signals()
    os.sched_setaffinity(0, {plan.client_core})
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    missing = wrapper_missing()
    results = report.Results(
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        commit=git_commit(), machine=machine.describe(), plan=dataclasses.asdict(plan),
        notes=[f"The wrapper was not measured: {missing}."] if missing else [],
    )
    results.note_load_average("start", machine.load_average())
    print(f"bench: server logs in {workdir / 'logs'}", flush=True)
    failed = True
    try:
        with LoadGenerator(plan.client_processes, cpus={plan.client_core}) as generator:
            bench = Bench(plan, workdir, generator, results)
            bench.fake_upstream_matrix(with_wrapper=missing is None)
            if plan.engine:
                bench.engine_matrix()
        failed = False
    except ServiceError as error:
        print(f"bench: {error}", file=sys.stderr)
        results.notes.append(f"Stopped early: {str(error).splitlines()[0]}")
    except KeyboardInterrupt as interrupt:
        print(f"bench: interrupted ({interrupt or 'Ctrl-C'}); every server was stopped", file=sys.stderr)
        results.notes.append("Interrupted: the results are partial.")
    finally:
        results.note_load_average("end", machine.load_average())
        paths = report.write(results, RESULTS_DIR)
        print("bench: wrote " + ", ".join(str(p.relative_to(REPO)) for p in paths), flush=True)
    if failed or results.error_count():
        print(f"bench: server logs kept in {workdir / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
