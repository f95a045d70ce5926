"""The wrapper's Prometheus metrics and the body of GET /metrics.

One scrape of the wrapper gives a dashboard everything: the wrapper's own
series (all named `vllm_api_*`), GPU memory read through NVML, and the
engine's `vllm:*` series, fetched from the engine's /metrics during the scrape.
While the engine is down or still loading, the wrapper's series are served
alone and `vllm_api_engine_metrics_up` is 0. With MODELS every loaded
engine's series are merged, so each family appears once: vLLM labels its
series with `model_name`, and the few it does not (process_*, python_*) get
that label here, so the engines' samples never collide.

With WORKERS>1 several processes share PORT and a scrape reaches only one of
them. prometheus_client's multiprocess mode makes every process write its
values to files in PROMETHEUS_MULTIPROC_DIR, and each scrape adds them up, so
counts do not depend on which worker answers.

The request functions (`observe_request`, `request_started`, ...) run on every
request: they use label children resolved once and cached.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from app.observability.gpu import gpu_memory
from app.observability.record import RequestRecord

logger = logging.getLogger(__name__)

METRIC_PREFIX = "vllm_api_"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format: every Prometheus 2.x and 3.x server parses it, and
# the engine's vllm:* names are valid in it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# LLM requests take from milliseconds (cached, short) to minutes (long generations).
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The causes the wrapper sets on RequestRecord.error_cause (see app/errors.py).
ERROR_CAUSES = (
    "client_error", "engine_error", "timeout", "rejected", "auth", "unavailable", "client_disconnected", "internal_error",
)
MEDIA_MODALITIES = ("image", "video")
# Clients choose the `model` they send; past this many names per process, new
# names are counted as OTHER_MODEL so a client cannot grow the series without bound.
MAX_MODEL_LABELS = 32
MAX_MODEL_LABEL_LENGTH = 128
OTHER_MODEL = "other"
ENGINE_METRICS_TIMEOUT_S = 1.0


@dataclass(slots=True)
class _RequestSeries:
    """The label children one (route, status, model) updates, resolved once."""

    requests: Counter
    duration: Histogram
    # None for requests without a model (probes, /info): no empty-label series.
    time_to_first_token: Histogram | None
    prompt_tokens: Counter | None
    completion_tokens: Counter | None


class WrapperMetrics:
    """The wrapper's metric families; `registry=None` in multiprocess mode."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        p = METRIC_PREFIX
        self.requests = Counter(
            p + "requests", "Requests answered by the wrapper, by route, HTTP status and model.",
            ["route", "status", "model"], registry=registry,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "Time from request received to last byte sent.",
            ["route", "model"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds", "Time from request received to the first generated token.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens of answered requests, as reported by the engine.",
            ["model"], registry=registry,
        )
        self.completion_tokens = Counter(
            p + "completion_tokens", "Generated tokens of answered requests, as reported by the engine.",
            ["model"], registry=registry,
        )
        self.errors = Counter(
            p + "errors", "Failed requests by cause: client_error, engine_error, timeout, rejected, auth, unavailable, "
            "client_disconnected, internal_error.",
            ["cause"], registry=registry,
        )
        self.media_items = Counter(
            p + "media_items", "Images and videos received in requests, by modality.",
            ["modality"], registry=registry,
        )
        self.in_flight = Gauge(
            p + "requests_in_flight", "Requests admitted to the engine and not yet finished (queued ones are in queue_depth).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Requests waiting for an engine slot (MAX_CONCURRENT_REQUESTS) now.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time requests waited for an engine slot.",
            buckets=QUEUE_WAIT_BUCKETS_S, registry=registry,
        )
        # Pre-created so every cause and modality has a series (0) from the start:
        # rate() over a series that appears late misses its first increase.
        self._errors = {cause: self.errors.labels(cause) for cause in ERROR_CAUSES}
        self._media = {modality: self.media_items.labels(modality) for modality in MEDIA_MODALITIES}
        self._series: dict[tuple[str, int, str], _RequestSeries] = {}
        self._models: set[str] = set()

    def observe(self, record: RequestRecord) -> None:
        model = self._model_label(record.model, record.status)
        key = (record.route, record.status, model)
        series = self._series.get(key) or self._resolve(key)
        series.requests.inc()
        series.duration.observe(record.duration_s)
        ttft = record.ttft_s
        if ttft is not None and series.time_to_first_token is not None:
            series.time_to_first_token.observe(ttft)
        if record.prompt_tokens and series.prompt_tokens is not None:
            series.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens and series.completion_tokens is not None:
            series.completion_tokens.inc(record.completion_tokens)
        if record.error_cause:
            errors = self._errors.get(record.error_cause) or self._errors.setdefault(
                record.error_cause, self.errors.labels(record.error_cause)
            )
            errors.inc()
        if record.images:
            self._media["image"].inc(record.images)
        if record.videos:
            self._media["video"].inc(record.videos)

    def _model_label(self, model: str | None, status: int) -> str:
        if not model:
            return ""
        if model in self._models:
            return model
        # Only names the engine accepted earn their own series.
        if status < 400 and len(self._models) < MAX_MODEL_LABELS and len(model) <= MAX_MODEL_LABEL_LENGTH:
            self._models.add(model)
            return model
        return OTHER_MODEL

    def _resolve(self, key: tuple[str, int, str]) -> _RequestSeries:
        route, status, model = key
        series = _RequestSeries(
            requests=self.requests.labels(route, str(status), model),
            duration=self.request_duration.labels(route, model),
            time_to_first_token=self.time_to_first_token.labels(model) if model else None,
            prompt_tokens=self.prompt_tokens.labels(model) if model else None,
            completion_tokens=self.completion_tokens.labels(model) if model else None,
        )
        self._series[key] = series
        return series


class GpuMemoryCollector:
    """GPU memory per GPU, read through NVML at scrape time (families without samples on a CPU)."""

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            METRIC_PREFIX + "gpu_memory_used_bytes", "GPU memory in use (NVML), by GPU index.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            METRIC_PREFIX + "gpu_memory_total_bytes", "GPU memory installed (NVML), by GPU index.", labels=["gpu"]
        )
        for reading in gpu_memory():
            used.add_metric([str(reading.index)], reading.used_bytes)
            total.add_metric([str(reading.index)], reading.total_bytes)
        yield used
        yield total


class _WrapperFamiliesOnly:
    """The wrapper's families from the shared directory.

    vLLM also honours PROMETHEUS_MULTIPROC_DIR; should the engine ever inherit
    it, its vllm:* files must not show up twice in the scrape.
    """

    def __init__(self, source: multiprocess.MultiProcessCollector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._source.collect() if family.name.startswith(METRIC_PREFIX))


class _Scrape:
    """The registry's families plus the ones computed for this scrape."""

    def __init__(self, registry: CollectorRegistry, extra: Iterable[Metric]) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        yield from self._extra


@dataclass(slots=True)
class _State:
    metrics: WrapperMetrics
    registry: CollectorRegistry


_state: _State | None = None


def setup_metrics(multiproc_dir: Path | None) -> None:
    """Create the wrapper's metrics in this process; call once per worker before serving.

    `multiproc_dir` is PROMETHEUS_MULTIPROC_DIR when WORKERS>1, else None
    (the values live in this process). Calling it again starts this
    process's values from zero; the shared files of other workers are kept.
    """
    global _state
    # *_created series double the series count and do not exist in multiprocess mode.
    disable_created_metrics()
    registry = CollectorRegistry()
    if multiproc_dir is None:
        metrics = WrapperMetrics(registry)
    else:
        _check_multiproc_env(multiproc_dir)
        _forget_dead_workers(multiproc_dir)
        metrics = WrapperMetrics(registry=None)
        registry.register(_WrapperFamiliesOnly(multiprocess.MultiProcessCollector(None, str(multiproc_dir))))
    registry.register(GpuMemoryCollector())
    _state = _State(metrics, registry)


def multiproc_dir_from_env() -> Path | None:
    """PROMETHEUS_MULTIPROC_DIR as set by the supervisor, or None in a single process."""
    value = os.environ.get(MULTIPROC_DIR_ENV, "").strip()
    return Path(value) if value else None


def prepare_multiproc_dir(path: Path) -> None:
    """Create or empty the shared directory; the supervisor calls it before starting workers."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def _check_multiproc_env(multiproc_dir: Path) -> None:
    # prometheus_client picks file-backed values when it is imported, from the environment.
    if os.environ.get(MULTIPROC_DIR_ENV) != str(multiproc_dir):
        raise RuntimeError(
            f"{MULTIPROC_DIR_ENV} must be set to {multiproc_dir} in the environment before the wrapper "
            "process starts; the supervisor sets it for the workers when WORKERS>1"
        )
    if not multiproc_dir.is_dir():
        raise RuntimeError(
            f"{MULTIPROC_DIR_ENV}={multiproc_dir} is not a directory; create it with prepare_multiproc_dir()"
        )


def _forget_dead_workers(multiproc_dir: Path) -> None:
    """Drop the live gauges of workers that died (a restarted worker would else count twice)."""
    for file in multiproc_dir.glob("gauge_live*_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        if not _process_exists(pid):
            multiprocess.mark_process_dead(pid, str(multiproc_dir))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _current() -> _State:
    if _state is None:
        # A process that never called setup_metrics (tests, scripts) gets what its environment says.
        setup_metrics(multiproc_dir_from_env())
    assert _state is not None
    return _state


# --- Hot path: called by the proxy on every request ------------------------------


def observe_request(record: RequestRecord) -> None:
    """Count a finished request: status, latency, TTFT, tokens, errors, media."""
    _current().metrics.observe(record)


def request_started() -> None:
    _current().metrics.in_flight.inc()


def request_finished() -> None:
    _current().metrics.in_flight.dec()


def queue_entered() -> None:
    """A request starts waiting for an engine slot."""
    _current().metrics.queue_depth.inc()


def queue_left(wait_s: float) -> None:
    """A request stops waiting (got a slot, timed out or was cancelled) after `wait_s`."""
    metrics = _current().metrics
    metrics.queue_depth.dec()
    metrics.queue_wait.observe(wait_s)


# --- GET /metrics ----------------------------------------------------------------


async def fetch_engine_metrics(
    session: aiohttp.ClientSession, engine_url: str, timeout_s: float = ENGINE_METRICS_TIMEOUT_S
) -> bytes | None:
    """The engine's exposition text, or None when it does not answer in time."""
    try:
        async with session.get(
            f"{engine_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200 or response.content_type != "text/plain":
                logger.debug("engine /metrics answered %s %s", response.status, response.content_type)
                return None
            body = await response.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        logger.debug("engine /metrics unavailable: %r", exc)
        return None
    return body if body.endswith(b"\n") else body + b"\n"


async def render_metrics(
    session: aiohttp.ClientSession, engine_url: str, timeout_s: float = ENGINE_METRICS_TIMEOUT_S
) -> tuple[bytes, str]:
    """Body and content type of GET /metrics: wrapper, GPU and engine families."""
    engine_text = await fetch_engine_metrics(session, engine_url, timeout_s)
    engine_up = GaugeMetricFamily(
        METRIC_PREFIX + "engine_metrics_up",
        "1 when this scrape includes the engine's vllm:* metrics; 0 while the engine is down or loading.",
        value=0.0 if engine_text is None else 1.0,
    )
    body = generate_latest(_Scrape(_current().registry, [engine_up]))
    return body + (engine_text or b""), CONTENT_TYPE


async def render_models_metrics(
    session: aiohttp.ClientSession, engines: Mapping[str, str], timeout_s: float = ENGINE_METRICS_TIMEOUT_S
) -> tuple[bytes, str]:
    """With MODELS: the wrapper's families and those of every engine in `engines` (model name -> URL)."""
    names = list(engines)
    texts = await asyncio.gather(*(fetch_engine_metrics(session, engines[name], timeout_s) for name in names))
    engine_up = GaugeMetricFamily(
        METRIC_PREFIX + "engine_metrics_up",
        "Per loaded model: 1 when this scrape includes its engine's vllm:* metrics, 0 when its engine did not answer.",
        labels=["model"],
    )
    for name, text in zip(names, texts, strict=True):
        engine_up.add_metric([name], 0.0 if text is None else 1.0)
    merged = merge_engine_families({name: text for name, text in zip(names, texts, strict=True) if text is not None})
    return generate_latest(_Scrape(_current().registry, [engine_up, *merged])), CONTENT_TYPE


def merge_engine_families(texts: Mapping[str, bytes]) -> list[Metric]:
    """The families of several engines' scrapes (model name -> text), each family once.

    A sample without a `model_name` label gets its engine's model there; an
    engine whose text does not parse is left out with a warning.
    """
    families: dict[str, Metric] = {}
    for model, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8", errors="replace")))
        except ValueError as exc:
            logger.warning("the engine of model %s sent /metrics that do not parse: %s", model, exc)
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                if "model_name" not in sample.labels:
                    sample = sample._replace(labels={**sample.labels, "model_name": model})
                merged.samples.append(sample)
    return list(families.values())
