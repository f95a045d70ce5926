"""WORKERS=auto follows the cores the container may use: its affinity, capped by a cgroup CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import load_settings
from app.cpus import auto_workers, available_cores


def cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> dict[str, Path]:
    """The cgroup files of one case, in a directory of their own."""
    directory = tmp_path / f"v2-{v2}-v1-{v1}".replace(" ", "_")
    directory.mkdir()
    paths = {"v2_max": directory / "cpu.max", "v1_quota": directory / "quota", "v1_period": directory / "period"}
    if v2 is not None:
        paths["v2_max"].write_text(v2 + "\n")
    if v1 is not None:
        paths["v1_quota"].write_text(v1[0] + "\n")
        paths["v1_period"].write_text(v1[1] + "\n")
    return paths


@pytest.fixture
def sixteen_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))


def test_the_affinity_counts_without_a_quota(tmp_path: Path, sixteen_cores: None) -> None:
    assert available_cores(**cgroup(tmp_path)) == 16
    assert available_cores(**cgroup(tmp_path, v2="max 100000")) == 16
    assert available_cores(**cgroup(tmp_path, v1=("-1", "100000"))) == 16


def test_a_quota_caps_the_affinity_rounded_up(tmp_path: Path, sixteen_cores: None) -> None:
    assert available_cores(**cgroup(tmp_path, v2="250000 100000")) == 3  # docker --cpus=2.5
    assert available_cores(**cgroup(tmp_path, v1=("400000", "100000"))) == 4
    assert available_cores(**cgroup(tmp_path, v2="50000 100000")) == 1
    assert available_cores(**cgroup(tmp_path, v2="6400000 100000")) == 16  # a quota above the cores


def test_auto_is_a_quarter_of_the_cores_from_one_to_eight() -> None:
    assert [auto_workers(cores) for cores in (1, 2, 4, 7, 8, 12, 16, 31, 32, 64, 128)] == [
        1, 1, 1, 1, 2, 3, 4, 7, 8, 8, 8,
    ]


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.config.auto_workers", lambda: 3)
    base = {"MODEL_NAME": "org/model"}

    assert load_settings(base).WORKERS == 3
    assert load_settings({**base, "WORKERS": "auto"}).WORKERS == 3
    assert load_settings({**base, "WORKERS": "2"}).WORKERS == 2
