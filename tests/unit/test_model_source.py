"""prepare_model: local directories and warm caches need no network; the rest is checked, then fetched."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import load_settings
from app.lifecycle import preflight as preflight_module
from app.lifecycle.model_source import PreparedModel, prepare_model
from app.lifecycle.startup_errors import StartupError
from app.lifecycle.status import DownloadProgress, Phase
from tests.fakehub import FakeHub, hub_environment, use_in_process

TOKEN = "hf_SecretValueThatMustNeverBeLogged42"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"\x07" * 65536)
    adapter = tmp_path_factory.mktemp("adapter")
    (adapter / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x09" * 8192)
    return {"org/model": model, "org/adapter": adapter, "org/gated": model}


@pytest.fixture
def hub(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(repos, gated={"org/gated"}, tokens={TOKEN: {"org/gated"}}) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


class Recorder:
    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.progress: list[DownloadProgress] = []

    def prepare(self, cache: Path, **env: str) -> PreparedModel:
        settings = load_settings({"HF_HOME": str(cache), **env})
        return prepare_model(settings, self.phases.append, self.progress.append)


def test_a_local_directory_is_served_as_it_is(hub: FakeHub, repos: dict[str, Path], tmp_path: Path) -> None:
    recorder = Recorder()

    prepared = recorder.prepare(tmp_path, MODEL_NAME=str(repos["org/model"]))

    assert prepared == PreparedModel(path=repos["org/model"], revision=None, lora_paths={}, offline=True)
    assert hub.total_requests == 0
    assert recorder.phases == []


def test_a_path_that_does_not_exist_names_model_name(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(
        StartupError, match=r"MODEL_NAME '/models/absent' is neither a local directory nor a Hub model id"
    ):
        Recorder().prepare(tmp_path, MODEL_NAME="/models/absent")
    assert hub.total_requests == 0


def test_the_first_start_downloads_and_the_second_needs_no_network(hub: FakeHub, tmp_path: Path) -> None:
    first = Recorder()
    prepared = first.prepare(tmp_path, MODEL_NAME="org/model")

    commit = hub.repos["org/model"].commit
    assert prepared.path == tmp_path / "hub" / "models--org--model" / "snapshots" / commit
    assert (prepared.path / "model.safetensors").is_file()
    assert prepared.revision == commit and not prepared.offline
    assert first.phases == [Phase.PREFLIGHT, Phase.DOWNLOADING]
    assert first.progress[-1].bytes_done == first.progress[-1].bytes_total > 0

    hub.reset_counters()
    second = Recorder()
    again = second.prepare(tmp_path, MODEL_NAME="org/model")

    assert again == PreparedModel(path=prepared.path, revision=commit, lora_paths={}, offline=True)
    assert hub.total_requests == 0
    assert second.phases == []


def test_a_pinned_commit_in_the_cache_needs_no_network(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.repos["org/model"].commit
    Recorder().prepare(tmp_path, MODEL_NAME="org/model", MODEL_REVISION=commit)
    hub.reset_counters()

    prepared = Recorder().prepare(tmp_path, MODEL_NAME="org/model", MODEL_REVISION=commit)

    assert prepared.offline and prepared.revision == commit
    assert hub.total_requests == 0


def test_a_warm_start_in_a_new_process_makes_no_request(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub reads HF_ENDPOINT at import, so only a fresh process shows every request it would make."""
    Recorder().prepare(tmp_path, MODEL_NAME="org/model")
    hub.reset_counters()
    env = {**os.environ, **hub_environment(hub), "HF_HOME": str(tmp_path), "MODEL_NAME": "org/model"}
    script = (
        "from app.config import load_settings\n"
        "from app.lifecycle.model_source import prepare_model\n"
        "print(prepare_model(load_settings(), print, print).offline)\n"
    )

    run = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert hub.total_requests == 0


def test_lora_adapters_from_the_hub_and_from_disk_are_prepared(
    hub: FakeHub, repos: dict[str, Path], tmp_path: Path
) -> None:
    local_adapter = repos["org/adapter"]

    prepared = Recorder().prepare(
        tmp_path, MODEL_NAME="org/model", LORA_MODULES=f"sql=org/adapter,local={local_adapter}"
    )

    adapter_commit = hub.repos["org/adapter"].commit
    assert prepared.lora_paths == {
        "sql": tmp_path / "hub" / "models--org--adapter" / "snapshots" / adapter_commit,
        "local": local_adapter,
    }
    assert (prepared.lora_paths["sql"] / "adapter_model.safetensors").is_file()

    hub.reset_counters()
    again = Recorder().prepare(tmp_path, MODEL_NAME="org/model", LORA_MODULES=f"sql=org/adapter,local={local_adapter}")
    assert again.offline and again.lora_paths == prepared.lora_paths
    assert hub.total_requests == 0


def test_only_what_is_missing_from_the_cache_is_fetched(hub: FakeHub, tmp_path: Path) -> None:
    Recorder().prepare(tmp_path, MODEL_NAME="org/model")
    hub.reset_counters()

    prepared = Recorder().prepare(tmp_path, MODEL_NAME="org/model", LORA_MODULES="sql=org/adapter")

    assert not prepared.offline
    assert all("org/model" not in key for key in hub.requests)
    assert hub.bytes_served.keys() == {"adapter_config.json", "adapter_model.safetensors"}


def test_a_missing_adapter_names_lora_modules(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"LORA_MODULES adapter 'sql=org/nope' does not exist.*check LORA_MODULES"):
        Recorder().prepare(tmp_path, MODEL_NAME="org/model", LORA_MODULES="sql=org/nope")


def test_a_fatal_problem_fails_within_15_seconds_before_any_download(hub: FakeHub, tmp_path: Path) -> None:
    recorder = Recorder()
    started = time.monotonic()

    with pytest.raises(StartupError, match="MODEL_REVISION 'v9' does not exist for org/model"):
        recorder.prepare(tmp_path, MODEL_NAME="org/model", MODEL_REVISION="v9")

    assert time.monotonic() - started < 15
    assert recorder.phases == [Phase.PREFLIGHT]
    assert not hub.bytes_served


def test_a_hub_outage_during_preflight_is_left_to_the_download(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight_module, "RETRY_WAITS_S", (0.0, 0.0))
    hub.fail(503, times=1)

    prepared = Recorder().prepare(tmp_path, MODEL_NAME="org/model")

    assert (prepared.path / "model.safetensors").is_file()
    assert hub.requests["GET /api/models/org/model"] == 2


def test_the_token_never_appears_in_logs_or_errors(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        prepared = Recorder().prepare(tmp_path, MODEL_NAME="org/gated", HF_TOKEN=TOKEN)
        with pytest.raises(StartupError) as refused:
            Recorder().prepare(tmp_path / "other", MODEL_NAME="org/gated", HF_TOKEN=TOKEN + "x")
        with pytest.raises(StartupError) as missing:
            Recorder().prepare(tmp_path / "other", MODEL_NAME="org/missing", HF_TOKEN=TOKEN)

    assert (prepared.path / "model.safetensors").is_file()
    assert caplog.records
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in str(record.__dict__)
    assert TOKEN not in str(refused.value) and TOKEN not in str(missing.value)
