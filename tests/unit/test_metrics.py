"""GET /metrics: the wrapper's series, the engine's series, GPU memory and worker processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.observability import gpu, metrics
from app.observability.record import RequestRecord

ROOT = Path(__file__).resolve().parents[2]
ENGINE_FIXTURE = ROOT / "tests" / "fixtures" / "engine_metrics.txt"
ENGINE_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
WRAPPER_FAMILIES = {
    "vllm_api_requests",
    "vllm_api_request_duration_seconds",
    "vllm_api_time_to_first_token_seconds",
    "vllm_api_prompt_tokens",
    "vllm_api_completion_tokens",
    "vllm_api_errors",
    "vllm_api_media_items",
    "vllm_api_requests_in_flight",
    "vllm_api_queue_depth",
    "vllm_api_queue_wait_seconds",
    "vllm_api_gpu_memory_used_bytes",
    "vllm_api_gpu_memory_total_bytes",
    "vllm_api_engine_metrics_up",
}


@pytest.fixture(autouse=True)
def fresh_metrics() -> None:
    metrics.setup_metrics(None)


def make_record(
    *,
    route: str = "/v1/chat/completions",
    status: int = 200,
    model: str | None = "tiny-llama",
    duration_s: float = 0.5,
    ttft_s: float | None = 0.1,
    prompt_tokens: int | None = 12,
    completion_tokens: int | None = 30,
    images: int = 0,
    videos: int = 0,
    error_cause: str | None = None,
) -> RequestRecord:
    record = RequestRecord(request_id="req-1", method="POST", path=route, route=route, client="127.0.0.1")
    record.status = status
    record.model = model
    record.finished = record.started + duration_s
    record.first_token_at = None if ttft_s is None else record.started + ttft_s
    record.prompt_tokens = prompt_tokens
    record.completion_tokens = completion_tokens
    record.images = images
    record.videos = videos
    record.error_cause = error_cause
    return record


def parse(body: bytes) -> dict[str, object]:
    families = list(text_string_to_metric_families(body.decode()))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"duplicate families: {sorted(n for n in names if names.count(n) > 1)}"
    return {family.name: family for family in families}


def sample_value(families: dict, sample_name: str, **labels: str) -> float:
    values = [
        sample.value
        for family in families.values()
        for sample in family.samples
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, f"{sample_name}{labels}: {values}"
    return values[0]


def engine_app(handler: Callable[[web.Request], object]) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


@pytest_asyncio.fixture
async def fake_engine() -> AsyncIterator[str]:
    """An engine /metrics that answers with a real vLLM scrape."""
    text = ENGINE_FIXTURE.read_text()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=text, headers={"Content-Type": ENGINE_CONTENT_TYPE})

    async with TestServer(engine_app(handler), host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.asyncio
async def test_scrape_holds_wrapper_and_engine_families(session: aiohttp.ClientSession, fake_engine: str) -> None:
    metrics.observe_request(make_record())

    body, content_type = await metrics.render_metrics(session, fake_engine)

    families = parse(body)
    engine_families = {f.name for f in text_string_to_metric_families(ENGINE_FIXTURE.read_text())}
    assert content_type.startswith("text/plain")
    assert WRAPPER_FAMILIES <= families.keys()
    assert engine_families <= families.keys()
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= families.keys()
    assert sample_value(families, "vllm_api_engine_metrics_up") == 1.0
    own = {name for name in families if not name.startswith("vllm_api_")}
    assert own == engine_families, "the wrapper adds families outside its vllm_api_ prefix"


@pytest.mark.asyncio
async def test_engine_down_still_serves_wrapper_metrics(session: aiohttp.ClientSession) -> None:
    metrics.observe_request(make_record())

    started = time.perf_counter()
    body, _ = await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}")
    elapsed = time.perf_counter() - started

    families = parse(body)
    assert elapsed < 30, "the scrape waited on a closed port"
    assert WRAPPER_FAMILIES <= families.keys()
    assert not any(name.startswith("vllm:") for name in families)
    assert sample_value(families, "vllm_api_engine_metrics_up") == 0.0


@pytest.mark.asyncio
async def test_hanging_engine_is_cut_after_the_timeout(session: aiohttp.ClientSession) -> None:
    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(300)
        return web.Response(text="")

    async with TestServer(engine_app(hang), host="127.0.0.1") as server:
        started = time.perf_counter()
        body, _ = await metrics.render_metrics(session, str(server.make_url("")).rstrip("/"))
        elapsed = time.perf_counter() - started

    families = parse(body)
    assert metrics.ENGINE_METRICS_TIMEOUT_S <= elapsed < 60, "the scrape was not cut at its timeout"
    assert sample_value(families, "vllm_api_engine_metrics_up") == 0.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "content_type", "text"),
    [(503, "text/plain", "model still loading"), (200, "text/html", "<html>not an engine</html>")],
)
async def test_answers_that_are_not_engine_metrics_are_left_out(
    session: aiohttp.ClientSession, status: int, content_type: str, text: str
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, text=text, content_type=content_type)

    async with TestServer(engine_app(handler), host="127.0.0.1") as server:
        body, _ = await metrics.render_metrics(session, str(server.make_url("")).rstrip("/"))

    families = parse(body)
    assert text not in body.decode()
    assert sample_value(families, "vllm_api_engine_metrics_up") == 0.0


@pytest.mark.asyncio
async def test_observed_records_are_counted(session: aiohttp.ClientSession) -> None:
    records = [
        make_record(duration_s=0.3, ttft_s=0.05, prompt_tokens=10, completion_tokens=20, images=2),
        make_record(duration_s=1.7, ttft_s=0.4, prompt_tokens=7, completion_tokens=50, videos=1),
        make_record(status=400, ttft_s=None, prompt_tokens=None, completion_tokens=None, error_cause="client_error"),
        make_record(status=504, ttft_s=None, completion_tokens=None, error_cause="timeout"),
        make_record(route="/v1/completions", ttft_s=0.2, completion_tokens=5),
    ]
    for record in records:
        metrics.observe_request(record)

    families = parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])

    chat = [r for r in records if r.route == "/v1/chat/completions"]
    for status in {r.status for r in chat}:
        expected = sum(1 for r in chat if r.status == status)
        got = sample_value(
            families, "vllm_api_requests_total", route="/v1/chat/completions", status=str(status), model="tiny-llama"
        )
        assert got == expected
    assert sample_value(families, "vllm_api_completion_tokens_total", model="tiny-llama") == sum(
        r.completion_tokens or 0 for r in records
    )
    assert sample_value(families, "vllm_api_prompt_tokens_total", model="tiny-llama") == sum(
        r.prompt_tokens or 0 for r in records
    )
    for cause in metrics.ERROR_CAUSES:
        expected = sum(1 for r in records if r.error_cause == cause)
        assert sample_value(families, "vllm_api_errors_total", cause=cause) == expected
    assert sample_value(families, "vllm_api_media_items_total", modality="image") == sum(r.images for r in records)
    assert sample_value(families, "vllm_api_media_items_total", modality="video") == sum(r.videos for r in records)
    with_ttft = [r for r in records if r.ttft_s is not None]
    assert sample_value(families, "vllm_api_time_to_first_token_seconds_count", model="tiny-llama") == len(with_ttft)
    assert sample_value(
        families, "vllm_api_time_to_first_token_seconds_sum", model="tiny-llama"
    ) == pytest.approx(sum(r.ttft_s for r in with_ttft))
    assert sample_value(
        families, "vllm_api_request_duration_seconds_count", route="/v1/chat/completions", model="tiny-llama"
    ) == len(chat)
    assert sample_value(
        families, "vllm_api_request_duration_seconds_sum", route="/v1/chat/completions", model="tiny-llama"
    ) == pytest.approx(sum(r.duration_s for r in chat))
    # 0.3 s falls in the 0.5 s bucket, 1.7 s does not.
    within_half_second = sum(1 for r in chat if r.duration_s <= 0.5)
    assert sample_value(
        families, "vllm_api_request_duration_seconds_bucket", route="/v1/chat/completions", model="tiny-llama", le="0.5"
    ) == within_half_second


@pytest.mark.asyncio
async def test_in_flight_and_queue_follow_the_helpers(session: aiohttp.ClientSession) -> None:
    metrics.request_started()
    metrics.request_started()
    metrics.request_finished()
    metrics.queue_entered()
    metrics.queue_entered()
    metrics.queue_left(0.25)

    families = parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])

    assert sample_value(families, "vllm_api_requests_in_flight") == 1.0
    assert sample_value(families, "vllm_api_queue_depth") == 1.0
    assert sample_value(families, "vllm_api_queue_wait_seconds_count") == 1.0
    assert sample_value(families, "vllm_api_queue_wait_seconds_sum") == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_client_chosen_model_names_cannot_grow_the_series(session: aiohttp.ClientSession) -> None:
    metrics.observe_request(make_record(status=404, model="no-such-model", error_cause="client_error"))
    for index in range(metrics.MAX_MODEL_LABELS + 5):
        metrics.observe_request(make_record(model=f"adapter-{index}"))

    families = parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])

    models = {s.labels["model"] for s in families["vllm_api_requests"].samples}
    assert "no-such-model" not in models
    assert len(models - {metrics.OTHER_MODEL}) == metrics.MAX_MODEL_LABELS
    assert sample_value(
        families, "vllm_api_requests_total", route="/v1/chat/completions", status="200", model=metrics.OTHER_MODEL
    ) == 5


class FakeNvml(SimpleNamespace):
    """The part of pynvml the wrapper calls, for two 80 GB GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: list[int], total: int) -> None:
        super().__init__(used=used, total=total)

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.used)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used[handle], total=self.total, free=self.total - self.used[handle])


@pytest.mark.asyncio
async def test_gpu_memory_per_gpu_when_nvml_answers(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml(used=[30 * 2**30, 5 * 2**30], total=80 * 2**30)
    monkeypatch.setattr(gpu, "pynvml", fake)
    monkeypatch.setattr(gpu, "_nvml_ready", None)

    families = parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])

    for index, used in enumerate(fake.used):
        assert sample_value(families, "vllm_api_gpu_memory_used_bytes", gpu=str(index)) == used
        assert sample_value(families, "vllm_api_gpu_memory_total_bytes", gpu=str(index)) == fake.total
    assert gpu.gpu_info() == {"name": "NVIDIA H100 80GB HBM3", "count": len(fake.used)}


@pytest.mark.asyncio
async def test_no_gpu_series_and_no_failure_without_nvml(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    class MissingLibrary(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    monkeypatch.setattr(gpu, "pynvml", MissingLibrary(used=[], total=0))
    monkeypatch.setattr(gpu, "_nvml_ready", None)

    families = parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])

    assert families["vllm_api_gpu_memory_used_bytes"].samples == []
    assert families["vllm_api_gpu_memory_total_bytes"].samples == []
    assert gpu.gpu_info() is None


def test_gpu_info_on_this_machine_does_not_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever this machine has (no nvidia-ml-py, no driver, or a GPU), the answer is well formed.
    monkeypatch.setattr(gpu, "_nvml_ready", None)
    info = gpu.gpu_info()
    assert info is None or (isinstance(info["name"], str) and info["count"] >= 1)


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from app.observability import metrics
    from app.observability.record import RequestRecord

    metrics.setup_metrics(Path(sys.argv[1]))
    for _ in range(int(sys.argv[2])):
        record = RequestRecord("r", "POST", "/v1/completions", "/v1/completions", None)
        record.status, record.model, record.completion_tokens = 200, "tiny-llama", 3
        record.finished = record.started + 0.1
        metrics.observe_request(record)
        metrics.request_started()
    print("ready", flush=True)
    sys.stdin.read()  # serve until the test closes stdin
    """
)


class Workers:
    """Wrapper worker processes sharing one PROMETHEUS_MULTIPROC_DIR, each with requests in flight."""

    def __init__(self, directory: Path, requests: list[int]) -> None:
        env = {**os.environ, metrics.MULTIPROC_DIR_ENV: str(directory), "PYTHONPATH": str(ROOT)}
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(directory), str(count)],
                env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for count in requests
        ]

    def __enter__(self) -> Workers:
        for process in self.processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.communicate(input="", timeout=30)


async def scrape_directory(session: aiohttp.ClientSession, directory: Path) -> dict[str, object]:
    metrics.setup_metrics(directory)
    return parse((await metrics.render_metrics(session, f"http://127.0.0.1:{closed_port()}"))[0])


@pytest.mark.asyncio
async def test_worker_processes_add_up(
    session: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.prepare_multiproc_dir(tmp_path)
    monkeypatch.setenv(metrics.MULTIPROC_DIR_ENV, str(tmp_path))
    requests_per_worker = [4, 7]
    completions = {"route": "/v1/completions", "status": "200", "model": "tiny-llama"}

    with Workers(tmp_path, requests_per_worker):
        live = await scrape_directory(session, tmp_path)
    # Both died; a replacement worker starts.
    with Workers(tmp_path, [0]):
        after_restart = await scrape_directory(session, tmp_path)

    assert sample_value(live, "vllm_api_requests_total", **completions) == sum(requests_per_worker)
    assert sample_value(live, "vllm_api_completion_tokens_total", model="tiny-llama") == 3 * sum(requests_per_worker)
    assert sample_value(live, "vllm_api_requests_in_flight") == sum(requests_per_worker)
    # Totals outlive the workers; the dead workers' in-flight requests do not.
    assert sample_value(after_restart, "vllm_api_requests_total", **completions) == sum(requests_per_worker)
    assert sample_value(after_restart, "vllm_api_requests_in_flight") == 0.0


def test_multiprocess_mode_needs_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=metrics.MULTIPROC_DIR_ENV):
        metrics.setup_metrics(tmp_path)


def test_exposition_fixture_is_a_real_engine_scrape() -> None:
    # Guards the fixture itself: refreshed copies must stay parseable and vLLM-shaped.
    families = {f.name: f for f in text_string_to_metric_families(ENGINE_FIXTURE.read_text())}
    assert families["vllm:num_requests_running"].type == "gauge"
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert sum(name.startswith("vllm:") for name in families) > 20


def test_engines_of_several_models_merge_into_one_family_each() -> None:
    text = ENGINE_FIXTURE.read_text()
    texts = {name: text.replace('model_name="tiny-llama"', f'model_name="{name}"').encode() for name in ("a", "b")}
    texts["broken"] = b"vllm:num_requests_running{model_name=\n"

    families = metrics.merge_engine_families(texts)

    body = generate_latest(_Families(families)).decode()
    parsed = parse(body.encode())
    assert set(parsed) == {family.name for family in text_string_to_metric_families(text)}
    running = parsed["vllm:num_requests_running"]
    assert {sample.labels["model_name"] for sample in running.samples} == {"a", "b"}  # the broken one left out
    # vLLM's unlabelled process series get their engine's model, so the two engines' samples stay apart.
    assert {sample.labels["model_name"] for sample in parsed["process_resident_memory_bytes"].samples} == {"a", "b"}


class _Families:
    def __init__(self, families: list[object]) -> None:
        self._families = families

    def collect(self) -> list[object]:
        return self._families
