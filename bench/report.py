"""Turn the benchmark's raw cells into the results: medians, ratios, PASS/FAIL, tables and plots.

Every repeat measures the wrapper and its baseline back to back, so each target
is computed per repeat (a paired ratio or difference) and the median over
repeats is reported with its range: the range is the noise of the machine.
Writes `latest.json` (everything, including each repeat), `latest.md` (the
tables a reader needs) and PNG plots into the results directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

from bench.machine import STALLED

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GATEWAY_LABELS = {
    "direct": "direct (no gateway)",
    "nginx": "nginx",
    "vllm-router": "vllm-router",
    "aiohttp": "FastAPI + aiohttp",
    "httpx": "FastAPI + httpx",
    "wrapper": "wrapper",
}
RATE_METRIC = {
    "stream": "chunks_per_s", "decode": "chunks_per_s", "engine": "chunks_per_s", "scale-stream": "chunks_per_s",
    "nonstream": "requests_per_s", "scale-nonstream": "requests_per_s",
}
TARGET_CONCURRENCY = 64
PEER = "vllm-router"  # the gateway the targets compare the wrapper with
DISTURBED = 0.10  # other processes' share of the gateway core above which a cell was disturbed
CPU_COST = {"cpu_us_per_request": "requests_per_s", "cpu_us_per_chunk": "chunks_per_s"}


@dataclasses.dataclass
class Repeat:
    rep: int
    summary: dict[str, float | int | None]
    cpu: dict[str, float]
    bottleneck: str
    errors: dict[str, int]


@dataclasses.dataclass
class Results:
    started: str
    commit: str
    machine: dict[str, object]
    plan: dict[str, object]
    notes: list[str] = dataclasses.field(default_factory=list)
    cells: dict[tuple[str, str, int], list[Repeat]] = dataclasses.field(default_factory=dict)
    load_averages: list[tuple[str, tuple[float, float, float]]] = dataclasses.field(default_factory=list)
    profiles: list[dict[str, object]] = dataclasses.field(default_factory=list)

    def add(self, scenario: str, gateway: str, concurrency: int, rep: int, summary: dict[str, float | int | None],
            cpu: dict[str, float], bottleneck: str, errors: dict[str, int]) -> None:
        self.cells.setdefault((scenario, gateway, concurrency), []).append(
            Repeat(rep, summary, cpu, bottleneck, errors)
        )

    def note_load_average(self, label: str, load: tuple[float, float, float]) -> None:
        self.load_averages.append((label, load))

    def error_count(self) -> int:
        return sum(int(r.summary.get("errors") or 0) for reps in self.cells.values() for r in reps)

    # --- aggregation ---------------------------------------------------------
    def median(self, scenario: str, gateway: str, concurrency: int, metric: str) -> float | None:
        values = [v for r in self.cells.get((scenario, gateway, concurrency), [])
                  if (v := _metric(r, metric)) is not None]
        return statistics.median(values) if values else None

    def paired(self, a: tuple[str, str, int], b: tuple[str, str, int], metric: str,
               combine: Callable[[float, float], float | None]) -> list[float]:
        """combine(a, b) for each repeat that measured both cells."""
        by_rep = {r.rep: r for r in self.cells.get(b, [])}
        out = []
        for ra in self.cells.get(a, []):
            rb = by_rep.get(ra.rep)
            va, vb = _metric(ra, metric), _metric(rb, metric) if rb else None
            if va is not None and vb is not None and (value := combine(va, vb)) is not None:
                out.append(value)
        return out

    def spread(self, key: tuple[str, str, int]) -> float | None:
        """(max - min) / median of the cell's rate over its repeats."""
        values = [v for r in self.cells.get(key, []) if (v := _metric(r, RATE_METRIC[key[0]])) is not None]
        if len(values) < 2 or statistics.median(values) == 0:
            return None
        return (max(values) - min(values)) / statistics.median(values)

    def limited_by(self, key: tuple[str, str, int]) -> str | None:
        """What limited most repeats of a cell: gateway, client or neither."""
        kinds = [r.bottleneck for r in self.cells.get(key, [])]
        return max(set(kinds), key=kinds.count) if kinds else None

    def concurrencies(self, scenario: str) -> list[int]:
        return sorted({c for (s, _, c) in self.cells if s == scenario})

    def gateways(self, scenario: str) -> list[str]:
        seen = [g for (s, g, _) in self.cells if s == scenario]
        return sorted(set(seen), key=lambda g: (list(GATEWAY_LABELS).index(g) if g in GATEWAY_LABELS else 99, g))


def _metric(repeat: Repeat, metric: str) -> float | None:
    if repeat.bottleneck == STALLED:
        return None  # the machine froze: the repeat measured nothing
    if metric in CPU_COST:
        # Gateway CPU time per request or chunk: what the gateway costs, whatever else ran on the machine.
        rate = repeat.summary.get(CPU_COST[metric]) or 0.0
        return 1e6 * repeat.cpu.get("gateway_cpu", 0.0) / float(rate) if rate else None
    value = repeat.summary.get(metric, repeat.cpu.get(metric))
    return None if value is None else float(value)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _difference(a: float, b: float) -> float:
    return a - b


# --- targets -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    target: str
    measured: str
    threshold: str
    result: str  # PASS | FAIL | not measured
    value: float | None = None
    low: float | None = None
    high: float | None = None
    caveat: str = ""


def _judge(target: str, values: list[float], threshold: float, at_least: bool, unit: str,
           caveat: str = "") -> Outcome:
    sign = "≥" if at_least else "≤"
    limit = f"{sign} {threshold:g}{unit}"
    if not values:
        return Outcome(target, "—", limit, "not measured")
    value = statistics.median(values)
    ok = value >= threshold if at_least else value <= threshold
    measured = f"{value:.3g}{unit}" if unit == "×" else f"{value:.3f}{unit}"
    return Outcome(target, measured, limit, "PASS" if ok else "FAIL", value, min(values), max(values), caveat)


def _caveat(results: Results, wrapper: tuple[str, str, int], baseline: tuple[str, str, int]) -> str:
    """Why a comparison may mislead: a client-bound baseline, or other load on the gateway core."""
    notes = []
    pinned = not baseline[0].startswith("scale")  # unpinned gateways share both cores: no single bottleneck
    if pinned and baseline[1] != "direct" and results.limited_by(baseline) == "client":
        notes.append(f"{_label(baseline[1])} was limited by the client side, not its own CPU: "
                     "its rate is a lower bound and the ratio an upper bound")
    others = [v for key in (wrapper, baseline)
              if (v := results.median(*key, "other_on_gateway_core")) is not None]
    if others and max(others) > DISTURBED:
        notes.append(f"other processes used {max(others):.0%} of the gateway core")
    return "; ".join(notes)


def _ratio_target(results: Results, target: str, wrapper: tuple[str, str, int], baseline: tuple[str, str, int],
                  metric: str, threshold: float) -> Outcome:
    return _judge(target, results.paired(wrapper, baseline, metric, _ratio), threshold, True, "×",
                  _caveat(results, wrapper, baseline))


def _cost_target(results: Results, target: str, wrapper: tuple[str, str, int], baseline: tuple[str, str, int],
                 threshold: float) -> Outcome:
    """The wrapper's CPU time per request over the baseline's: it holds on a busy machine and when a cell
    was client-bound (a gateway at 100% of its core serves 1 / cost requests/s)."""
    ratios = results.paired(wrapper, baseline, "cpu_us_per_request", _ratio)
    return _judge(target, ratios, threshold, False, "×")


def _difference_target(results: Results, target: str, wrapper: tuple[str, str, int],
                       baseline: tuple[str, str, int], metric: str, threshold_ms: float) -> Outcome:
    return _judge(target, results.paired(wrapper, baseline, metric, _difference), threshold_ms, False, " ms",
                  _caveat(results, wrapper, baseline))


def evaluate_targets(results: Results) -> list[Outcome]:
    c = TARGET_CONCURRENCY
    outcomes = [
        _cost_target(results, f"Non-streamed CPU per request vs {PEER} (c={c}, one core)",
                     ("nonstream", "wrapper", c), ("nonstream", PEER, c), 2.0),
        _cost_target(results, f"Streamed CPU per request (64 chunks) vs {PEER} (c={c}, one core)",
                     ("stream", "wrapper", c), ("stream", PEER, c), 1.5),
        _difference_target(results, f"Non-streamed latency at c=1 over {PEER}'s, p50",
                           ("nonstream", "wrapper", 1), ("nonstream", PEER, 1), "latency_ms_p50", 0.1),
        _difference_target(results, f"Streamed TTFT at c=1 over {PEER}'s, p50",
                           ("stream", "wrapper", 1), ("stream", PEER, 1), "ttft_ms_p50", 0.1),
        _ratio_target(results, "Decode (5 ms/token, c=64): chunk rate vs direct",
                      ("decode", "wrapper", c), ("decode", "direct", c), "chunks_per_s", 0.99),
        _difference_target(results, "Decode (5 ms/token, c=64): growth of the p99 inter-chunk gap",
                           ("decode", "wrapper", c), ("decode", "direct", c), "gap_ms_p99", 1.0),
    ]
    engine_c = results.concurrencies("engine")
    target = f"Real CPU engine tokens/s vs direct, c={engine_c[0]}..{engine_c[-1]} (worst c)" if engine_c else \
        "Real CPU engine tokens/s vs direct, c=1..32"
    # The worst concurrency decides, by its median paired ratio.
    medians = {n: statistics.median(v) for n in engine_c
               if (v := results.paired(("engine", "wrapper", n), ("engine", "direct", n), "chunks_per_s", _ratio))}
    if medians:
        worst = min(medians, key=lambda n: medians[n])
        outcome = _ratio_target(results, target, ("engine", "wrapper", worst), ("engine", "direct", worst),
                                "chunks_per_s", 0.98)
        outcomes.append(dataclasses.replace(outcome, measured=f"{outcome.measured} (c={worst})"))
    else:
        outcomes.append(_judge(target, [], 0.98, True, "×"))
    for scenario, metric in (("scale-stream", "chunks_per_s"), ("scale-nonstream", "requests_per_s")):
        for many in (g for g in results.gateways(scenario) if g != "wrapper-1w"):
            kind = "streaming chunks/s" if scenario == "scale-stream" else "non-streaming requests/s"
            workers = many.removeprefix("wrapper-").removesuffix("w")
            outcomes.append(_ratio_target(
                results, f"Scale-out: {workers} workers on {workers} cores vs 1 on one, {kind}, c=64",
                (scenario, many, c), (scenario, "wrapper-1w", c), metric, 1.0))
    return outcomes


# --- markdown ------------------------------------------------------------------
def _table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _label(gateway: str) -> str:
    return GATEWAY_LABELS.get(gateway, gateway)


def _rate_table(results: Results, scenario: str, baselines: list[str]) -> list[str]:
    metric = RATE_METRIC[scenario]
    gateways = results.gateways(scenario)
    ratios = [b for b in baselines if b in gateways and "wrapper" in gateways]
    headers = ["c", *(_label(g) for g in gateways), *(f"wrapper / {_label(b)}" for b in ratios)]
    rows = []
    for c in results.concurrencies(scenario):
        row = [str(c)]
        for g in gateways:
            cpu = results.median(scenario, g, c, "gateway_cpu")
            cpu_text = f" ({cpu:.0%})" if cpu is not None and g != "direct" else ""
            row.append(_rate(results.median(scenario, g, c, metric)) + cpu_text)
        for b in ratios:
            values = results.paired((scenario, "wrapper", c), (scenario, b, c), metric, _ratio)
            row.append(f"{statistics.median(values):.2f}×" if values else "—")
        rows.append(row)
    return _table(headers, rows)


def _latency_table(results: Results, scenario: str, metric: str) -> list[str]:
    gateways = results.gateways(scenario)
    headers = ["c", *(_label(g) for g in gateways)]
    rows = []
    for c in results.concurrencies(scenario):
        cells = []
        for g in gateways:
            p50 = results.median(scenario, g, c, f"{metric}_ms_p50")
            p99 = results.median(scenario, g, c, f"{metric}_ms_p99")
            cells.append(f"{_ms(p50)} / {_ms(p99)}")
        rows.append([str(c), *cells])
    return _table(headers, rows)


def _compared(gateways: Iterable[str]) -> list[str]:
    """Other revisions of the wrapper measured in the same run (`--compare REF`)."""
    return [g for g in gateways if g.startswith("wrapper@")]


def _cpu_cost_table(results: Results) -> list[str]:
    """Gateway CPU time per request at the highest concurrency, and the wrapper's over each baseline's.

    A gateway that saturates its core serves 1 / (CPU per request) requests/s, so the ratio of
    two gateways' CPU costs is the inverse ratio of their capacities, even when a cell was
    client-bound or disturbed by other load. Ratios are medians of paired repeats.
    """
    gateways = [g for g in results.gateways("stream") if g != "direct"]
    baselines = [b for b in (PEER, "nginx", "aiohttp", *_compared(gateways)) if b in gateways and "wrapper" in gateways]
    rows = []
    for scenario, what in (("stream", "streamed request (64 chunks)"), ("nonstream", "non-streamed request"),
                           ("decode", "streamed request, 5 ms/token")):
        cs = results.concurrencies(scenario)
        if not cs:
            continue
        c = cs[-1]
        costs = {g: results.median(scenario, g, c, "cpu_us_per_request") for g in gateways}
        ratios = []
        for b in baselines:
            values = results.paired((scenario, "wrapper", c), (scenario, b, c), "cpu_us_per_request", _ratio)
            ratios.append(f"{statistics.median(values):.2f}×" if values else "—")
        rows.append([f"{what}, c={c}", *(_rate(costs[g]) for g in gateways), *ratios])
    headers = ["gateway CPU per request (µs)", *(_label(g) for g in gateways),
               *(f"wrapper / {_label(b)}" for b in baselines)]
    return _table(headers, rows) if rows else []


def _added_latency_table(results: Results) -> list[str]:
    rows = []
    for scenario, metric, what in (("stream", "ttft_ms_p50", "TTFT p50, streaming"),
                                   ("nonstream", "latency_ms_p50", "latency p50, non-streaming")):
        gateways = [g for g in results.gateways(scenario) if g != "direct"]
        row = [what]
        for g in gateways:
            values = results.paired((scenario, g, 1), (scenario, "direct", 1), metric, _difference)
            row.append(f"{statistics.median(values):+.3f}" if values else "—")
        rows.append(row)
    gateways = [g for g in results.gateways("stream") if g != "direct"]
    return _table(["added at c=1 (ms)", *(_label(g) for g in gateways)], rows)


def _noise_lines(results: Results) -> list[str]:
    spreads = [s for key in results.cells if (s := results.spread(key)) is not None]
    others = [r.cpu["other_on_gateway_core"] for reps in results.cells.values() for r in reps
              if "other_on_gateway_core" in r.cpu]
    steal = [r.cpu["steal"] for reps in results.cells.values() for r in reps if "steal" in r.cpu]
    loads = ", ".join(f"{label}: {' / '.join(f'{x:.2f}' for x in load)}" for label, load in results.load_averages)
    stalled = sum(r.bottleneck == STALLED for reps in results.cells.values() for r in reps)
    lines = [f"- Load average (1/5/15 min): {loads or '—'}."]
    if stalled:
        lines.append(f"- {stalled} cell repeat(s) stalled (no request ended or failed: the machine froze) "
                     "and are left out of every figure.")
    if spreads:
        lines.append("- Spread of a cell's rate between repeats ((max−min)/median): "
                     f"median {_pct(statistics.median(spreads))}, worst {_pct(max(spreads))}.")
    if others:
        lines.append("- CPU used on the gateway core by other processes during a cell: "
                     f"median {_pct(statistics.median(others))}, worst {_pct(max(others))}.")
    if steal:
        lines.append(f"- VM steal time: worst {_pct(max(steal))} of a cell.")
    return lines


def markdown(results: Results, outcomes: list[Outcome], plots: list[Path]) -> str:
    plan = results.plan
    m = results.machine
    out = [
        "# Gateway benchmark results",
        "",
        (f"Run {results.started}, commit {results.commit}. "
         f"{'Quick smoke run' if plan.get('quick') else 'Full run'}: {plan.get('repeats')} repeat(s) of every cell, "
         f"{plan.get('duration_s')} s measured after {plan.get('warmup_s')} s of warm-up; "
         "each figure is the median over repeats."),
        (f"Machine: {m.get('cpus')} × {m.get('cpu_model')}, {m.get('memory_gib')} GiB, Linux {m.get('kernel')}, "
         f"Python {m.get('python')}. Gateways pinned to core {plan.get('gateway_core', 0)}; fake upstream, "
         f"load generator and runner on core {plan.get('client_core', 1)}."),
        "",
    ]
    out += [f"> {note}" for note in results.notes]
    out += ["", "## Targets", ""]
    out += _table(["target", "measured (median of repeats)", "range over repeats", "target", "result", "caveat"],
                  ([o.target, o.measured, "—" if o.low is None else f"{o.low:.3g} … {o.high:.3g}", o.threshold,
                    f"**{o.result}**", o.caveat] for o in outcomes))
    out += ["## Machine noise", "", *_noise_lines(results), ""]
    sections = [
        ("stream", "Streaming, zero-latency upstream: chunks/s (gateway CPU share)", [PEER, "nginx", "aiohttp"]),
        ("nonstream", "Non-streaming, zero-latency upstream: requests/s (gateway CPU share)",
         [PEER, "aiohttp", "nginx"]),
    ]
    for scenario, title, baselines in sections:
        if results.concurrencies(scenario):
            baselines += _compared(results.gateways(scenario))
            out += [f"## {title}", "", *_rate_table(results, scenario, baselines)]
    if results.concurrencies("stream"):
        out += ["## Streaming: TTFT p50 / p99 (ms)", "", *_latency_table(results, "stream", "ttft")]
        out += ["## Streaming: total latency p50 / p99 (ms)", "", *_latency_table(results, "stream", "latency")]
    if results.concurrencies("nonstream"):
        out += ["## Non-streaming: latency p50 / p99 (ms)", "", *_latency_table(results, "nonstream", "latency")]
    cost = _cpu_cost_table(results)
    if cost:
        out += ["## Gateway CPU cost (process CPU time / requests; lower is better)", "", *cost]
    if results.concurrencies("stream") and 1 in results.concurrencies("stream"):
        out += ["## Added latency at c=1 (median of paired repeats)", "", *_added_latency_table(results)]
    if results.concurrencies("decode"):
        out += ["## Realistic decode: 5 ms between tokens, c=64", ""]
        rows = []
        for g in results.gateways("decode"):
            c = results.concurrencies("decode")[0]
            ratio = results.paired(("decode", g, c), ("decode", "direct", c), "chunks_per_s", _ratio)
            rows.append([_label(g), _rate(results.median("decode", g, c, "chunks_per_s")),
                         f"{statistics.median(ratio):.4f}×" if ratio else "—",
                         _ms(results.median("decode", g, c, "gap_ms_p50")),
                         _ms(results.median("decode", g, c, "gap_ms_p99")),
                         _ms(results.median("decode", g, c, "ttft_ms_p50")),
                         _pct(results.median("decode", g, c, "gateway_cpu"))])
        out += _table(["gateway", "chunks/s", "vs direct", "gap p50 (ms)", "gap p99 (ms)", "TTFT p50 (ms)",
                       "gateway CPU"], rows)
    if results.concurrencies("engine"):
        out += ["## Real CPU engine (tiny model, 64 tokens per request): chunks/s", "",
                *_rate_table(results, "engine", ["direct"])]
        out += ["TTFT p50 / p99 (ms):", "", *_latency_table(results, "engine", "ttft")]
    for scenario in ("scale-stream", "scale-nonstream"):
        if results.concurrencies(scenario):
            what = "chunks/s" if scenario == "scale-stream" else "requests/s"
            out += [f"## Scale-out: 1 worker pinned to one core, N workers to N cores, {what} (gateway CPU share)",
                    "", *_rate_table(results, scenario, [])]
    if results.profiles:
        out += ["## Where the wrapper's time goes (py-spy, c=64)", "",
                ("Samples of the thread holding the GIL, by wall clock: when other processes share the gateway "
                 "core, preemption lands more samples in long CPU bursts (such as garbage collection), so compare "
                 "profiles only from quiet runs."), ""]
        for prof in results.profiles:
            out += [f"### {prof['title']}", "", f"Flame graph: `{prof['svg']}`; {prof['samples']} samples.", ""]
            out += _table(["self %", "package or wrapper module"],
                          ([f"{row['self']:.1f}", f"`{row['component']}`"]
                           for row in prof["components"]))  # type: ignore[attr-defined]
            out += _table(["self %", "total %", "function"],
                          ([f"{row['self']:.1f}", f"{row['total']:.1f}", f"`{row['function']}`"]
                           for row in prof["top"]))  # type: ignore[attr-defined]
    out += ["## Every cell", ""]
    rows = []
    for (scenario, gateway, c), reps in sorted(results.cells.items()):
        metric = RATE_METRIC[scenario]
        bottlenecks = sorted({r.bottleneck for r in reps})
        errors = sum(int(r.summary.get("errors") or 0) for r in reps)
        rows.append([scenario, gateway, str(c), _rate(results.median(scenario, gateway, c, metric)),
                     _pct(results.spread((scenario, gateway, c))),
                     _pct(results.median(scenario, gateway, c, "gateway_cpu")),
                     _rate(results.median(scenario, gateway, c, "cpu_us_per_request")),
                     _pct(results.median(scenario, gateway, c, "other_on_gateway_core")),
                     _pct(results.median(scenario, gateway, c, "core0_busy")),
                     _pct(results.median(scenario, gateway, c, "core1_busy")),
                     "/".join(bottlenecks), str(errors)])
    out += _table(["scenario", "gateway", "c", "rate (chunks/s or req/s)", "spread", "gateway CPU",
                   "CPU µs/request", "other load on gateway core", "core 0", "core 1", "limited by", "errors"], rows)
    if plots:
        out += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(out)


# --- plots -------------------------------------------------------------------
def _plot_scenario(ax: plt.Axes, results: Results, scenario: str, metric: str, title: str, ylabel: str,
                   dashed_metric: str | None = None) -> None:
    for gateway in results.gateways(scenario):
        cs = results.concurrencies(scenario)
        values = [results.median(scenario, gateway, c, metric) for c in cs]
        points = [(c, v) for c, v in zip(cs, values, strict=True) if v is not None]
        if not points:
            continue
        line, = ax.plot(*zip(*points, strict=True), marker="o", label=_label(gateway))
        if dashed_metric:
            dashed = [(c, v) for c in cs if (v := results.median(scenario, gateway, c, dashed_metric)) is not None]
            if dashed:
                ax.plot(*zip(*dashed, strict=True), linestyle="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ticks = results.concurrencies(scenario)
    ax.set_xticks(ticks, labels=[str(c) for c in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plots(results: Results, directory: Path) -> list[Path]:
    written = []
    panels = [(s, m, t, y) for s, m, t, y in (
        ("stream", "chunks_per_s", "Streaming (64 chunks), one core", "chunks/s"),
        ("nonstream", "requests_per_s", "Non-streaming, one core", "requests/s"),
        ("engine", "chunks_per_s", "Real CPU engine (tiny model)", "chunks/s (≈ tokens/s)"),
    ) if results.concurrencies(s)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (scenario, metric, title, ylabel) in zip(axes[0], panels, strict=True):
            _plot_scenario(ax, results, scenario, metric, title, ylabel)
        fig.tight_layout()
        path = directory / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    panels = [(s, m) for s, m in (("stream", "ttft"), ("nonstream", "latency")) if results.concurrencies(s)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (scenario, metric) in zip(axes[0], panels, strict=True):
            what = "TTFT" if metric == "ttft" else "latency"
            kind = "Streaming" if scenario == "stream" else "Non-streaming"
            _plot_scenario(ax, results, scenario, f"{metric}_ms_p50", f"{kind} {what}: p50 (solid), p99 (dashed)",
                           f"{what} (ms)", dashed_metric=f"{metric}_ms_p99")
            ax.set_yscale("log")
        fig.tight_layout()
        path = directory / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- output --------------------------------------------------------------------
def to_json(results: Results, outcomes: list[Outcome]) -> dict[str, object]:
    return {
        "started": results.started,
        "commit": results.commit,
        "machine": results.machine,
        "plan": results.plan,
        "notes": results.notes,
        "load_averages": [{"when": label, "load": list(load)} for label, load in results.load_averages],
        "targets": [dataclasses.asdict(o) for o in outcomes],
        "cells": [
            {
                "scenario": scenario, "gateway": gateway, "concurrency": c,
                "median": {metric: results.median(scenario, gateway, c, metric)
                           for metric in (*reps[0].summary.keys(), *reps[0].cpu.keys())
                           if metric != "errors"},
                "spread": results.spread((scenario, gateway, c)),
                "repeats": [{"rep": r.rep, **r.summary, "cpu": r.cpu, "limited_by": r.bottleneck,
                             "error_kinds": r.errors} for r in reps],
            }
            for (scenario, gateway, c), reps in results.cells.items()
        ],
        "profiles": results.profiles,
    }


def from_json(data: dict[str, Any]) -> Results:
    """The Results that `to_json` wrote (targets and medians are recomputed, not read)."""
    results = Results(started=data["started"], commit=data["commit"], machine=data["machine"], plan=data["plan"],
                      notes=list(data["notes"]), profiles=list(data.get("profiles") or []))
    for entry in data["load_averages"]:
        results.note_load_average(entry["when"], tuple(entry["load"]))
    for cell in data["cells"]:
        for repeat in cell["repeats"]:
            summary = {k: v for k, v in repeat.items() if k not in ("rep", "cpu", "limited_by", "error_kinds")}
            results.add(cell["scenario"], cell["gateway"], cell["concurrency"], repeat["rep"], summary,
                        repeat["cpu"], repeat["limited_by"], repeat["error_kinds"])
    return results


def write(results: Results, directory: Path) -> list[Path]:
    """Write latest.json, latest.md and the plots; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    outcomes = evaluate_targets(results)
    images = plots(results, directory)
    json_path = directory / "latest.json"
    json_path.write_text(json.dumps(to_json(results, outcomes), indent=2) + "\n")
    md_path = directory / "latest.md"
    md_path.write_text(markdown(results, outcomes, images) + "\n")
    return [md_path, json_path, *images]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the report again from latest.json (e.g. after a change here).")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory holding latest.json (default: bench/results)")
    args = parser.parse_args(argv)
    source = args.results / "latest.json"
    if not source.is_file():
        raise SystemExit(f"bench.report: no {source}; run the benchmark first (`make bench`)")
    paths = write(from_json(json.loads(source.read_text())), args.results)
    print("bench.report: wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
