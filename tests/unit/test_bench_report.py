"""The benchmark report judges each target from paired repeats and says PASS, FAIL or not measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.profile import summarize_stacks
from bench.report import Outcome, Results, evaluate_targets, from_json, markdown, write


def results_with(cells: dict[tuple[str, str, int], list[dict[str, float]]]) -> Results:
    """Cells whose repeats have these figures; `gateway_cpu` (share of a core) defaults to 1.0."""
    results = Results(started="2026-01-01T00:00:00+00:00", commit="abc", machine={"cpus": 2}, plan={"repeats": 3})
    for (scenario, gateway, c), repeats in cells.items():
        for rep, metrics in enumerate(repeats):
            figures = dict(metrics)
            cpu = {"gateway_cpu": figures.pop("gateway_cpu", 1.0), "core0_busy": 1.0, "core1_busy": 0.5}
            summary = {"chunks_per_s": 0.0, "requests_per_s": 0.0, "errors": 0, **figures}
            results.add(scenario, gateway, c, rep, summary, cpu, "gateway", {})
    return results


def outcome(results: Results, prefix: str) -> Outcome:
    return next(o for o in evaluate_targets(results) if o.target.startswith(prefix))


def test_cost_targets_compare_cpu_per_request_with_the_peer_in_paired_repeats() -> None:
    results = results_with({
        # 1.0 of a core: 1e6 / rate µs per request.
        ("nonstream", "wrapper", 64): [{"requests_per_s": 5000.0}, {"requests_per_s": 4000.0},
                                       {"requests_per_s": 8000.0}],
        ("nonstream", "vllm-router", 64): [{"requests_per_s": 10000.0}] * 3,
        # The peer used half a core: its cost per request is half of what its rate alone says.
        ("stream", "wrapper", 64): [{"requests_per_s": 1000.0}] * 3,
        ("stream", "vllm-router", 64): [{"requests_per_s": 1000.0, "gateway_cpu": 0.5}] * 3,
    })

    non_streamed = outcome(results, "Non-streamed CPU per request vs vllm-router")
    streamed = outcome(results, "Streamed CPU per request (64 chunks) vs vllm-router")

    # Wrapper / peer CPU per request: 200/100, 250/100, 125/100 µs.
    assert (non_streamed.result, non_streamed.value, non_streamed.low, non_streamed.high) == ("PASS", 2.0, 1.25, 2.5)
    assert (streamed.result, streamed.value) == ("FAIL", 2.0)


def test_difference_targets_and_missing_cells() -> None:
    results = results_with({
        ("stream", "wrapper", 1): [{"ttft_ms_p50": 1.0}, {"ttft_ms_p50": 0.7}],
        ("stream", "vllm-router", 1): [{"ttft_ms_p50": 0.6}, {"ttft_ms_p50": 0.6}],
        ("nonstream", "wrapper", 1): [{"latency_ms_p50": 0.65}] * 2,
        ("nonstream", "vllm-router", 1): [{"latency_ms_p50": 0.6}] * 2,
    })

    streamed = outcome(results, "Streamed TTFT at c=1 over vllm-router's")
    non_streamed = outcome(results, "Non-streamed latency at c=1 over vllm-router's")

    assert streamed.result == "FAIL"
    assert streamed.value == pytest.approx(0.25)  # median of the paired differences 0.4 and 0.1
    assert non_streamed.result == "PASS" and non_streamed.value == pytest.approx(0.05)
    assert outcome(results, "Decode (5 ms/token, c=64): chunk rate").result == "not measured"
    assert outcome(results, "Real CPU engine").result == "not measured"


def test_engine_target_is_decided_by_the_worst_concurrency() -> None:
    results = results_with({
        ("engine", "wrapper", 1): [{"chunks_per_s": 99.0}] * 3,
        ("engine", "direct", 1): [{"chunks_per_s": 100.0}] * 3,
        ("engine", "wrapper", 8): [{"chunks_per_s": 95.0}] * 3,
        ("engine", "direct", 8): [{"chunks_per_s": 100.0}] * 3,
    })

    engine = outcome(results, "Real CPU engine")

    assert engine.result == "FAIL"
    assert engine.value == 0.95 and "c=8" in engine.measured


def test_write_produces_markdown_json_and_plots(tmp_path: Path) -> None:
    results = results_with({
        ("stream", gateway, c): [{"chunks_per_s": rate * c, "ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0}] * 3
        for gateway, rate in (("direct", 300.0), ("vllm-router", 200.0), ("wrapper", 150.0), ("wrapper@main", 100.0))
        for c in (1, 64)
    })

    paths = write(results, tmp_path)

    assert {p.name for p in paths} == {"latest.md", "latest.json", "throughput.png", "latency.png"}
    markdown = (tmp_path / "latest.md").read_text()
    assert "| Streamed CPU per request (64 chunks) vs vllm-router" in markdown and "**PASS**" in markdown
    # The revision measured with --compare gets its own column and ratio.
    assert "| wrapper@main |" in markdown and "wrapper / wrapper@main" in markdown
    data = json.loads((tmp_path / "latest.json").read_text())
    cell = next(c for c in data["cells"]
                if (c["scenario"], c["gateway"], c["concurrency"]) == ("stream", "wrapper", 64))
    assert cell["median"]["chunks_per_s"] == 150.0 * 64
    assert len(cell["repeats"]) == 3
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")


def test_profile_stacks_reduce_to_self_and_total_shares() -> None:
    collapsed = (
        "main (app/serve.py:10);relay (app/proxy/relay.py:40);json.loads (json/__init__.py:346) 6\n"
        "main (app/serve.py:10);relay (app/proxy/relay.py:55) 3\n"
        "main (app/serve.py:12);log (app/observability/access.py:20) 1\n"
    )

    summary = summarize_stacks(collapsed)

    assert summary["samples"] == 10
    shares = {row["function"]: (row["self"], row["total"]) for row in summary["top"]}
    assert shares["json.loads (json/__init__.py)"] == (60.0, 60.0)
    assert shares["relay (app/proxy/relay.py)"] == (30.0, 90.0)  # lines 40 and 55 are one function
    assert shares["log (app/observability/access.py)"] == (10.0, 10.0)
    assert "main (app/serve.py)" not in shares  # no self samples
    by_component = {row["component"]: row["self"] for row in summary["components"]}
    assert by_component == {"json": 60.0, "app/proxy/relay.py": 30.0, "app/observability/access.py": 10.0}


def test_stalled_repeats_are_left_out() -> None:
    results = results_with({
        ("decode", "wrapper", 64): [{"chunks_per_s": 70.0}, {"chunks_per_s": 80.0}],
        ("decode", "direct", 64): [{"chunks_per_s": 100.0}, {"chunks_per_s": 100.0}],
    })
    # The machine froze during the third repeat: nothing ended, nothing failed.
    results.add("decode", "wrapper", 64, 2, {"chunks_per_s": 0.0, "requests": 0, "errors": 0}, {}, "stalled", {})
    results.add("decode", "direct", 64, 2, {"chunks_per_s": 0.0, "requests": 0, "errors": 0}, {}, "stalled", {})

    assert results.median("decode", "wrapper", 64, "chunks_per_s") == 75.0
    assert outcome(results, "Decode (5 ms/token, c=64): chunk rate").value == pytest.approx(0.75)


def test_report_can_be_written_again_from_its_json(tmp_path: Path) -> None:
    results = results_with({
        ("stream", "wrapper", 64): [{"chunks_per_s": 70.0, "ttft_ms_p50": 1.0}, {"chunks_per_s": 80.0}],
        ("stream", "nginx", 64): [{"chunks_per_s": 100.0}, {"chunks_per_s": 100.0}],
    })
    results.note_load_average("start", (1.0, 0.5, 0.25))
    write(results, tmp_path)

    again = from_json(json.loads((tmp_path / "latest.json").read_text()))

    outcomes = evaluate_targets(results)
    assert evaluate_targets(again) == outcomes
    assert markdown(again, outcomes, []) == markdown(results, outcomes, [])
