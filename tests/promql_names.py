"""Check that a dashboard's PromQL asks only for metrics a scrape really has.

A dashboard panel whose metric was renamed or never existed shows "No data"
without any error. These helpers parse every expression with a real PromQL
parser, take the metric names out of it, and compare them with the names an
exposition text provides. The unit tests run them against the wrapper's
metrics plus a captured engine scrape; the end-to-end tests run them against a
live scrape of the stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

# Series Prometheus adds to every target itself; no /metrics serves them.
PROMETHEUS_SERIES = frozenset({
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
})
# Grafana replaces $__rate_interval and friends before Prometheus sees the query.
_GRAFANA_VARIABLE = re.compile(r"\$\{?__\w+\}?")
_SUFFIXES_BY_TYPE = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every target expression of a Grafana dashboard, rows' nested panels included."""
    exprs: list[str] = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            exprs.extend(target["expr"] for target in inner.get("targets", []) if "expr" in target)
    return exprs


def load_dashboard_exprs(path: Path) -> list[str]:
    return dashboard_exprs(json.loads(path.read_text()))


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, e.g. {"vllm_api_requests_total"}."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(_selector_name(node, expr))

    promql_parser.walk(promql_parser.parse(_GRAFANA_VARIABLE.sub("5m", expr)), visit)
    return names


def _selector_name(selector: promql_parser.VectorSelector, expr: str) -> str:
    if selector.name:
        return selector.name
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return matcher.value
    raise ValueError(f"cannot tell which metric {selector} selects in {expr!r}; name it explicitly")


def exposed_names(exposition: str) -> set[str]:
    """Every series name an exposition text provides, declared families without samples included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES_BY_TYPE.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def missing_names(exprs: Iterable[str], exposition: str) -> dict[str, set[str]]:
    """Expressions mapped to the metric names they need but the scrape lacks; empty when all exist."""
    available = exposed_names(exposition) | PROMETHEUS_SERIES
    missing: dict[str, set[str]] = {}
    for expr in exprs:
        absent = metric_names(expr) - available
        if absent:
            missing[expr] = absent
    return missing
