"""How the end-to-end tests drive the user-facing clients: the openai SDK, test_api.py and client_example.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai

from tests.stack import Stack, port

ROOT = Path(__file__).resolve().parents[2]
MEDIA_PORT = port(761)  # under E2E_PORT_BASE, like every test port


def openai_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=180)


def request_log_line(stack: Stack, request_id: str) -> dict[str, Any]:
    """The one access-log line of the request with this X-Request-ID."""
    lines = [line for line in stack.request_lines() if line.get("request_id") == request_id]
    assert len(lines) == 1, lines
    return lines[0]


def run_test_api(base_url: str, tmp_path: Path, *args: str) -> tuple[int, str, dict[str, dict[str, Any]]]:
    """Exit code, output and the report rows by check name of `python test_api.py base_url`."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "test_api.py"), base_url, "--json", str(report), "--media-port", str(MEDIA_PORT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    rows = {row["check"]: row for row in json.loads(report.read_text())["results"]}
    return result.returncode, result.stdout + result.stderr, rows


def statuses(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: row["status"] for name, row in rows.items()}


def skipped(rows: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, status in statuses(rows).items() if status == "skip"}


def run_client_example(base_url: str, *args: str) -> list[dict[str, Any]]:
    """The JSON lines `python client_example.py --base-url URL ARGS...` prints; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "client_example.py"), "--base-url", base_url, *args],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]
