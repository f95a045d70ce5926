"""monitoring/: the Prometheus config, Grafana provisioning and dashboard, checked as the stack loads them.

promtool comes from Debian's `prometheus` package (`apt-get install -y prometheus`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.observability import metrics
from app.observability.record import RequestRecord
from tests.promql_names import dashboard_exprs, metric_names, missing_names

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "vllm-inference-api.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "vllm-inference-api.json"
ENGINE_FIXTURE = ROOT / "tests" / "fixtures" / "engine_metrics.txt"
# Where the compose file mounts monitoring/grafana/dashboards in the Grafana container.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
PROMTOOL_APT_PACKAGE = "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool is missing: apt-get install -y {PROMTOOL_APT_PACKAGE}")
    return path


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_documented_api_key_block_passes_promtool(tmp_path: Path) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text("sk-test-key")
    # Uncomment the documented block, as an operator would, with a key file that exists.
    commented = re.compile(r"(?m)^(\s*)# (authorization:|  type: Bearer|  credentials_file: )")
    enabled = commented.sub(r"\1\2", PROMETHEUS_CONFIG.read_text())
    enabled = re.sub(r"credentials_file: \S+", f"credentials_file: {key_file}", enabled)
    config = tmp_path / "prometheus.yml"
    config.write_text(enabled)

    result = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = [j for j in yaml.safe_load(enabled)["scrape_configs"] if j["job_name"] == "vllm-inference-api"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(key_file)}


def test_prometheus_scrapes_the_wrapper() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    job = jobs["vllm-inference-api"]

    assert job["metrics_path"] == "/metrics"
    assert [target for group in job["static_configs"] for target in group["targets"]] == ["api:8000"]
    # The wrapper waits up to ENGINE_METRICS_TIMEOUT_S for the engine during a scrape.
    assert float(job["scrape_timeout"].rstrip("s")) > metrics.ENGINE_METRICS_TIMEOUT_S


def test_grafana_datasource_is_the_one_the_dashboard_uses() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    panel_sources = {json.dumps(panel["datasource"], sort_keys=True) for panel in dashboard()["panels"]}

    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert panel_sources == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    (provider,) = load_yaml(PROVIDERS)["providers"]

    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def test_dashboard_structure() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]

    assert board["uid"] and board["title"]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_shows_the_required_views() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs(dashboard())))

    assert {
        "up",
        "vllm_api_requests_total",
        "vllm_api_request_duration_seconds_bucket",
        "vllm_api_time_to_first_token_seconds_bucket",
        "vllm_api_completion_tokens_total",
        "vllm_api_errors_total",
        "vllm_api_requests_in_flight",
        "vllm_api_queue_depth",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm_api_gpu_memory_used_bytes",
        "vllm_api_gpu_memory_total_bytes",
    } <= used


@pytest_asyncio.fixture
async def scrape() -> AsyncIterator[str]:
    """What Prometheus gets from the wrapper after one request, with the engine answering a real vLLM scrape."""
    engine_text = ENGINE_FIXTURE.read_text()

    async def engine_metrics(_: web.Request) -> web.Response:
        return web.Response(text=engine_text, headers={"Content-Type": "text/plain; version=1.0.0; charset=utf-8"})

    app = web.Application()
    app.router.add_get("/metrics", engine_metrics)
    metrics.setup_metrics(None)
    record = RequestRecord("r", "POST", "/v1/chat/completions", "/v1/chat/completions", None)
    record.status, record.model, record.prompt_tokens, record.completion_tokens = 200, "tiny-llama", 5, 7
    record.first_token_at = record.started + 0.05
    record.finished = record.started + 0.2
    metrics.observe_request(record)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        body, _ = await metrics.render_metrics(session, str(server.make_url("")).rstrip("/"))
    yield body.decode()


@pytest.mark.asyncio
async def test_every_dashboard_metric_exists_in_a_scrape(scrape: str) -> None:
    assert missing_names(dashboard_exprs(dashboard()), scrape) == {}


@pytest.mark.asyncio
async def test_name_check_reports_what_a_scrape_lacks(scrape: str) -> None:
    exprs = [
        "sum(rate(vllm_api_request_duration_seconds_bucket[$__rate_interval]))",
        "sum(rate(vllm_api_renamed_requests_total[$__rate_interval]))",
        'max({__name__="vllm:gpu_cache_usage_perc"})',
    ]

    assert missing_names(exprs, scrape) == {
        exprs[1]: {"vllm_api_renamed_requests_total"},
        exprs[2]: {"vllm:gpu_cache_usage_perc"},
    }
