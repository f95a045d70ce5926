"""The build-time download of the Dockerfile's `baked` target, against the local Hub double.

The Hub cannot be reached from the test machines; tests/fakehub.py stands in
for it. The image build itself (BuildKit secret, no network at start) is
tested in tests/e2e/test_container_smoke.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.lifecycle.bake import main, read_token
from tests.fakehub import FakeHub, use_in_process

TOKEN = "hf_bake_token_for_tests_0123"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"\1" * 4096)
    (model / "pytorch_model.bin").write_bytes(b"\2" * 4096)
    with FakeHub({"org/gated": model}, gated={"org/gated"}, tokens={TOKEN: {"org/gated"}}) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


def test_a_gated_model_is_baked_with_the_secrets_token_and_only_the_weights_the_engine_loads(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(TOKEN + "\n")
    monkeypatch.setattr("app.lifecycle.bake.TOKEN_SECRET", secret)

    assert main(["org/gated", "main", str(tmp_path / "opt-model")]) == 0

    baked = {path.name for path in (tmp_path / "opt-model").iterdir()}
    assert baked == {"config.json", "model.safetensors"}  # no .bin copy, no .cache folder
    assert not any(TOKEN in path.read_bytes().decode(errors="replace") for path in (tmp_path / "opt-model").iterdir())


def test_without_the_token_the_build_fails_with_the_sentence(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.lifecycle.bake.TOKEN_SECRET", tmp_path / "absent")

    assert main(["org/gated", "main", str(tmp_path / "opt-model")]) == 1

    error = capsys.readouterr().err
    assert "BAKE_MODEL 'org/gated' is gated or private: set HF_TOKEN" in error
    assert hub.bytes_served == {}


def test_no_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["", "main", "/opt/model"]) == 2
    assert "--build-arg BAKE_MODEL=org/name" in capsys.readouterr().err


def test_an_empty_secret_is_no_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    assert read_token(tmp_path / "token") is None
