"""Downloads fetch only the weights the engine loads, resume across processes and report progress."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.lifecycle.download import (
    download_snapshots,
    find_complete_snapshot,
    select_files,
    weight_ignore_patterns,
)
from app.lifecycle.preflight import HubRepo, RepoListing, preflight
from app.lifecycle.startup_errors import StartupError
from app.lifecycle.status import DownloadProgress
from tests.fakehub import FakeHub, hub_environment, use_in_process

MiB = 1024 * 1024
WEIGHTS_SIZE = 25 * MiB  # above huggingface_hub's 10 MiB write chunk, so partial files exist
REPO = HubRepo(repo_id="org/model", revision=None, setting="MODEL_NAME", label="MODEL_NAME 'org/model'")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository shipping safetensors plus the PyTorch and TensorFlow copies many real ones carry."""
    directory = tmp_path_factory.mktemp("model")
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * (WEIGHTS_SIZE // 256))
    (directory / "pytorch_model.bin").write_bytes(b"\x02" * MiB)
    (directory / "tf_model.h5").write_bytes(b"\x03" * MiB)
    return directory


@pytest.fixture
def hub(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({"org/model": model_dir}) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


def download(hub: FakeHub, cache_dir: Path, progress: list[DownloadProgress] | None = None) -> Path:
    listing = preflight(REPO, None, hub.url)
    reports = [] if progress is None else progress
    [snapshot] = download_snapshots(
        [listing], cache_dir=cache_dir, token=None, endpoint=hub.url, on_progress=reports.append, poll_interval_s=0.02
    )
    return snapshot.path


def weights_blob(hub: FakeHub, cache_dir: Path) -> Path:
    etag = hub.repos["org/model"].files["model.safetensors"].etag
    return cache_dir / "hub" / "models--org--model" / "blobs" / etag


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("files", "kept"),
    [
        (
            [
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "tf_model.h5",
                "flax_model.msgpack",
                "onnx/model.onnx",
            ],
            ["config.json", "model.safetensors"],
        ),
        (
            ["config.json", "model-00001-of-00002.safetensors", "original/consolidated.00.pth", "model.gguf"],
            ["config.json", "model-00001-of-00002.safetensors"],
        ),
        (
            ["config.json", "pytorch_model.bin", "tf_model.h5", "training_args.bin"],
            ["config.json", "pytorch_model.bin", "training_args.bin"],
        ),
        (["config.json", "model.gguf"], ["config.json", "model.gguf"]),
    ],
)
def test_only_the_weights_the_engine_loads_are_selected(files: list[str], kept: list[str]) -> None:
    assert select_files(files) == kept


def test_nothing_is_ignored_in_a_repository_without_weights() -> None:
    assert weight_ignore_patterns(["adapter_config.json", "README.md"]) == []


def test_only_safetensors_are_downloaded_when_both_formats_exist(hub: FakeHub, tmp_path: Path) -> None:
    snapshot = download(hub, tmp_path)

    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert set(hub.bytes_served) == {"config.json", "model.safetensors", "tokenizer.json"}


def test_the_snapshot_uses_the_standard_cache_layout(hub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    commit = hub.repos["org/model"].commit

    snapshot = download(hub, tmp_path)

    storage = tmp_path / "hub" / "models--org--model"
    assert snapshot == storage / "snapshots" / commit
    assert (storage / "refs" / "main").read_text() == commit
    assert (snapshot / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_a_complete_snapshot_is_found_without_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    snapshot = download(hub, tmp_path)
    commit = hub.repos["org/model"].commit
    hub.close()

    for revision in (None, "main", commit):
        found = find_complete_snapshot("org/model", revision, tmp_path)
        assert found is not None and found.path == snapshot and found.commit == commit
    assert find_complete_snapshot("org/model", "v2", tmp_path) is None
    assert find_complete_snapshot("org/other", None, tmp_path) is None


def test_a_snapshot_missing_a_file_is_not_complete(hub: FakeHub, tmp_path: Path) -> None:
    snapshot = download(hub, tmp_path)
    (snapshot / "tokenizer.json").unlink()

    assert find_complete_snapshot("org/model", None, tmp_path) is None


def test_progress_reports_the_total_and_growing_bytes_with_few_log_records(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.bytes_per_second = 20 * MiB
    progress: list[DownloadProgress] = []
    listing = preflight(REPO, None, hub.url)
    expected_total = sum(f.size for f in listing.files if f.path in select_files(g.path for g in listing.files))

    with caplog.at_level(logging.INFO, logger="app.lifecycle.download"):
        download_snapshots(
            [listing],
            cache_dir=tmp_path,
            token=None,
            endpoint=hub.url,
            on_progress=progress.append,
            poll_interval_s=0.02,
            log_interval_s=60.0,
        )

    done = [p.bytes_done for p in progress]
    assert {p.bytes_total for p in progress} == {expected_total}
    assert done == sorted(done)
    assert done[-1] == expected_total
    assert any(0 < d < expected_total for d in done)
    assert any(p.rate_bytes_s for p in progress)
    records = [
        r for r in caplog.records if r.name == "app.lifecycle.download" and r.getMessage() == "download progress"
    ]
    # One record per 10 % step at most (the interval is longer than the download), far fewer than the reports.
    assert 1 <= len(records) <= 11 < len(progress)
    assert all(r.bytes_total == expected_total and isinstance(r.bytes_done, int) for r in records)
    finished = [r for r in caplog.records if r.getMessage() == "download finished"]
    assert len(finished) == 1 and finished[0].bytes_done == expected_total


def test_a_connection_cut_mid_file_is_resumed(hub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    hub.cut_after_bytes = 15 * MiB

    download(hub, tmp_path)

    assert sha256(weights_blob(hub, tmp_path)) == sha256(model_dir / "model.safetensors")
    assert WEIGHTS_SIZE < hub.bytes_served["model.safetensors"] < 2 * WEIGHTS_SIZE


def test_a_partial_blob_from_an_earlier_process_is_continued(hub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    blob = weights_blob(hub, tmp_path)
    blob.parent.mkdir(parents=True)
    present = 11 * MiB
    blob.with_name(f"{blob.name}.5f3a9c1e.incomplete").write_bytes(
        (model_dir / "model.safetensors").read_bytes()[:present]
    )

    download(hub, tmp_path)

    assert hub.bytes_served["model.safetensors"] == WEIGHTS_SIZE - present
    assert sha256(blob) == sha256(model_dir / "model.safetensors")
    assert not list(blob.parent.glob("*.incomplete"))


def test_a_partial_blob_that_is_not_a_prefix_is_fetched_again(
    hub: FakeHub, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blob = weights_blob(hub, tmp_path)
    blob.parent.mkdir(parents=True)
    blob.with_name(f"{blob.name}.0b1c2d3e.incomplete").write_bytes(b"\0" * (11 * MiB))

    with caplog.at_level(logging.WARNING, logger="app.lifecycle.download"):
        download(hub, tmp_path)

    assert sha256(blob) == sha256(model_dir / "model.safetensors")
    assert any("did not match its checksum" in r.getMessage() for r in caplog.records)
    assert not list(blob.parent.glob("*.incomplete"))


def test_a_download_killed_mid_file_resumes_in_a_new_process(hub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, **hub_environment(hub), "HF_HOME": str(tmp_path), "MODEL_NAME": "org/model"}
    env.pop("HF_TOKEN", None)
    script = (
        "from app.config import load_settings\n"
        "from app.lifecycle.model_source import prepare_model\n"
        "prepared = prepare_model(load_settings(), lambda phase: None, lambda progress: None)\n"
        "print(prepared.path)\n"
    )
    blobs = weights_blob(hub, tmp_path).parent
    hub.stall_after_bytes = 12 * MiB  # the library writes its first 10 MiB, then waits for more

    first = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 10 * MiB for p in blobs.glob("*.incomplete")):
            assert first.poll() is None and time.monotonic() < deadline, "the first download never wrote a partial blob"
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    hub.reset_counters()

    second = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert second.returncode == 0, second.stderr
    assert hub.bytes_served["model.safetensors"] <= WEIGHTS_SIZE - 10 * MiB
    snapshot = Path(second.stdout.strip().splitlines()[-1])
    assert sha256(snapshot / "model.safetensors") == sha256(model_dir / "model.safetensors")


def test_a_disk_too_small_fails_before_downloading(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing: RepoListing = preflight(REPO, None, hub.url)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 * MiB, used=9 * MiB, free=MiB))

    with pytest.raises(StartupError, match=r"Not enough disk space for MODEL_NAME 'org/model'.*HF_HOME"):
        download_snapshots([listing], cache_dir=tmp_path, token=None, endpoint=hub.url, on_progress=lambda p: None)
    assert not hub.bytes_served
