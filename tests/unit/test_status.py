"""The status file carries the engine's log tail for /info, and the public view never does."""

from __future__ import annotations

import json
from pathlib import Path

from app.lifecycle.status import LOG_TAIL_LINE_CHARS, LOG_TAIL_LINES, Phase, StartupStatus, read_status, write_status

SENTENCE = "The engine exited with code 1 during startup for a reason this image does not recognise."
ENGINE_LINES = [f"engine line {index}: /models/secret-path --flag value" for index in range(30)]


def failed_status() -> StartupStatus:
    status = StartupStatus()
    status.enter(Phase.FAILED, SENTENCE, ENGINE_LINES)
    return status


def test_the_public_view_has_the_sentence_but_not_the_log_tail() -> None:
    public = failed_status().to_json()
    assert public["error"] == SENTENCE
    assert "engine_log_tail" not in public
    assert "engine line" not in json.dumps(public)


def test_the_status_file_carries_the_last_lines_for_info(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, failed_status())

    status = read_status(path)

    assert status is not None and status.error == SENTENCE
    assert status.engine_log_tail == ENGINE_LINES[-LOG_TAIL_LINES:]
    assert status.to_json(private=True)["engine_log_tail"] == ENGINE_LINES[-LOG_TAIL_LINES:]


def test_long_lines_are_cut_and_a_new_phase_clears_the_tail() -> None:
    status = StartupStatus()
    status.enter(Phase.FAILED, SENTENCE, ["z" * 100_000])
    assert status.engine_log_tail == ["z" * LOG_TAIL_LINE_CHARS]
    status.enter(Phase.DRAINING)
    assert status.engine_log_tail == [] and status.error is None
