"""The start-up benchmark's own logic: the first-request ratio, its requests and its report.

The starts themselves (real engines, tens of seconds each) are the benchmark's
run, not a unit test; here `Start` records stand in for them.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from app.lifecycle.warmup import image_request as warmup_image_request
from bench.startup import (
    FOLLOWING_REQUESTS,
    Start,
    describe,
    first_request_ratio,
    image_request,
    parse,
    report,
)


def image_url(body: dict[str, object]) -> str:
    content = body["messages"][0]["content"]  # type: ignore[index]
    return next(part["image_url"]["url"] for part in content if part["type"] == "image_url")


def vlm_start(scenario: str, repeat: int, latencies: list[float], after_pause_s: float = 0.15) -> Start:
    return Start(scenario, repeat, first_answer_s=1.0, ready_s=40.0, image_requests_s=latencies,
                 after_pause_s=after_pause_s, phases={"loading": 38.0, "warmup": 0.2}, load_average=(1.0, 1.0, 1.0))


def test_the_ratio_is_the_first_request_over_the_median_of_the_next() -> None:
    assert first_request_ratio([0.6, 0.1, 0.3, 0.2]) == pytest.approx(3.0)
    assert first_request_ratio([0.2, 0.2, 0.2]) == pytest.approx(1.0)
    assert first_request_ratio([0.1, 0.3, 0.2, 0.2]) == pytest.approx(0.5), "a fast first request shows below 1"


@pytest.mark.parametrize("latencies", [[], [0.5]])
def test_no_ratio_without_a_first_request_and_a_next_one(latencies: list[float]) -> None:
    assert first_request_ratio(latencies) is None


def test_every_request_has_an_image_of_its_own_and_none_is_the_warm_ups() -> None:
    """vLLM caches processed images by content: a repeated image would make a request cheaper."""
    urls = [image_url(image_request("m", index)) for index in range(1 + FOLLOWING_REQUESTS)]
    assert len(set(urls)) == len(urls)
    assert image_url(warmup_image_request("m")[2]) not in urls
    data = base64.b64decode(urls[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_the_report_gives_each_warmup_setting_its_ratio_median_and_range() -> None:
    args = parse(["--repeats", "3", "--scenarios", "vlm-warmup,vlm-no-warmup"])
    rest = [0.1] * FOLLOWING_REQUESTS
    starts = [
        vlm_start("vlm-warmup", 1, [0.11, *rest]), vlm_start("vlm-warmup", 2, [0.09, *rest]),
        vlm_start("vlm-warmup", 3, [0.10, *rest]),
        vlm_start("vlm-no-warmup", 1, [0.50, *rest]), vlm_start("vlm-no-warmup", 2, [0.30, *rest]),
        vlm_start("vlm-no-warmup", 3, [0.40, *rest]),
    ]
    text = report(starts, args)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| vlm-")
            and "×" in line}
    assert rows["vlm-warmup"].split(" | ")[1:] == ["true", "3", "0.100", "0.100", "1.00× (0.90–1.10)", "1.50× (1.50–1.50) |"]
    assert rows["vlm-no-warmup"].split(" | ")[1:] == ["false", "3", "0.400", "0.100", "4.00× (3.00–5.00)", "1.50× (1.50–1.50) |"]
    assert "1.00× the next" in describe(starts[2])


def test_a_failed_start_is_left_out_of_the_ratio_and_named() -> None:
    args = parse(["--scenarios", "vlm-warmup"])
    failed = Start("vlm-warmup", 2, error="TimeoutError: not ready", load_average=(1.0, 1.0, 1.0))
    text = report([vlm_start("vlm-warmup", 1, [0.2, *[0.1] * FOLLOWING_REQUESTS]), failed], args)
    assert "| vlm-warmup | true | 1 | 0.200 | 0.100 | 2.00× (2.00–2.00) | 1.50× (1.50–1.50) |" in text
    assert "vlm-warmup #2: TimeoutError: not ready" in text


def test_the_default_run_includes_both_warmup_settings_and_refuses_unknown_scenarios() -> None:
    assert {"vlm-warmup", "vlm-no-warmup", "bare", "warm"} <= set(parse([]).scenarios)
    with pytest.raises(SystemExit):
        parse(["--scenarios", "vlm-lukewarm"])


def test_the_report_gives_each_swap_its_first_token_and_compares_it_with_a_warm_start() -> None:
    args = parse(["--scenarios", "warm,swap"])
    starts = [
        Start("warm", 1, ready_s=40.0, first_token_s=40.0, load_average=(1.0, 1.0, 1.0)),
        Start("swap", 1, ready_s=5.0, swap_ttft_s=[38.0, 46.0, 42.0], load_average=(1.0, 1.0, 1.0)),
        Start("swap", 2, ready_s=5.0, swap_ttft_s=[40.0, 46.0, 42.0], load_average=(1.0, 1.0, 1.0)),
    ]
    text = report(starts, args)
    assert "| 2 | 39.00 (38.0–40.0) | 46.00 (46.0–46.0) | 42.00 (42.0–42.0) |" in text
    assert "A swap's first token over a warm single-model start's (from its spawn): 1.10×." in text  # 44 / 40
    assert "first tokens a 38.00 s, b 46.00 s, a 42.00 s" in describe(starts[1])
    assert "swap" in parse([]).scenarios
