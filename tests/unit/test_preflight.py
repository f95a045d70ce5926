"""The preflight turns every Hub refusal into one sentence naming the variable to fix, within 15 s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.lifecycle import preflight as preflight_module
from app.lifecycle.preflight import HubRepo, HubUnreachable, list_with_retries, preflight
from app.lifecycle.startup_errors import StartupError
from tests.fakehub import FakeHub, use_in_process

GOOD_TOKEN = "hf_GoodTokenWithAccess0123456789"
OTHER_TOKEN = "hf_ValidTokenWithoutAccess987654"
UNKNOWN_TOKEN = "hf_RevokedTokenNobodyKnows555555"
FATAL_WITHIN_S = 15.0
CONFIG = '{"architectures": ["LlamaForCausalLM"]}'
WEIGHTS = b"\x01" * 4096


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(CONFIG)
    (model / "model.safetensors").write_bytes(WEIGHTS)
    repos = {"org/model": model, "org/gated": model, "org/private": model}
    tokens = {GOOD_TOKEN: {"org/gated", "org/private"}, OTHER_TOKEN: set()}
    with FakeHub(repos, gated={"org/gated"}, private={"org/private"}, tokens=tokens) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


def model_repo(repo_id: str, revision: str | None = None) -> HubRepo:
    return HubRepo(repo_id=repo_id, revision=revision, setting="MODEL_NAME", label=f"MODEL_NAME '{repo_id}'")


def refusal(hub: FakeHub, repo: HubRepo, token: str | None) -> str:
    started = time.monotonic()
    with pytest.raises(StartupError) as caught:
        preflight(repo, token, hub.url)
    assert time.monotonic() - started < FATAL_WITHIN_S
    message = str(caught.value)
    for secret in (GOOD_TOKEN, OTHER_TOKEN, UNKNOWN_TOKEN):
        assert secret not in message
    return message


def test_a_public_model_passes_with_one_request(hub: FakeHub) -> None:
    listing = preflight(model_repo("org/model"), None, hub.url)

    assert listing.commit == hub.repos["org/model"].commit
    assert {f.path: f.size for f in listing.files} == {"config.json": len(CONFIG), "model.safetensors": len(WEIGHTS)}
    assert hub.requests == {"GET /api/models/org/model": 1}


def test_lfs_files_are_keyed_by_sha256_and_others_by_git_blob_id(hub: FakeHub) -> None:
    listing = preflight(model_repo("org/model"), None, hub.url)

    served = hub.repos["org/model"].files
    assert {f.path: f.etag for f in listing.files} == {
        "config.json": served["config.json"].blob_id,
        "model.safetensors": served["model.safetensors"].sha256,
    }


def test_a_commit_sha_revision_passes(hub: FakeHub) -> None:
    commit = hub.repos["org/model"].commit
    assert preflight(model_repo("org/model", commit), None, hub.url).commit == commit


def test_a_missing_repository_names_model_name(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/missing"), None)

    assert message.startswith("MODEL_NAME 'org/missing' does not exist on the Hub")
    assert "check MODEL_NAME" in message


def test_a_gated_model_without_token_asks_for_hf_token(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/gated"), None)

    assert message.startswith("MODEL_NAME 'org/gated' is gated or private: set HF_TOKEN")
    assert "no HF_TOKEN is set" in message


def test_a_gated_model_with_a_token_without_access_says_the_token_was_refused(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/gated"), OTHER_TOKEN)

    assert "set HF_TOKEN to a token with access" in message
    assert "the current token was refused" in message


def test_a_gated_model_with_an_authorised_token_passes(hub: FakeHub) -> None:
    listing = preflight(model_repo("org/gated"), GOOD_TOKEN, hub.url)

    assert listing.commit == hub.repos["org/gated"].commit
    # The metadata request, then one file request: only a file tells whether a gated repository lets us in.
    assert hub.total_requests == 2


def test_an_invalid_token_names_hf_token(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/model"), UNKNOWN_TOKEN)

    assert message.startswith("HF_TOKEN was refused by the Hub as invalid or expired")


def test_a_private_model_without_token_suggests_hf_token(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/private"), None)

    assert "or it is private and no HF_TOKEN is set" in message


def test_a_private_model_with_a_token_without_access_mentions_the_token(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/private"), OTHER_TOKEN)

    assert "HF_TOKEN has no access to it" in message


def test_a_missing_revision_names_model_revision(hub: FakeHub) -> None:
    message = refusal(hub, model_repo("org/model", "v9"), None)

    assert message.startswith("MODEL_REVISION 'v9' does not exist for org/model")


def test_an_adapter_is_named_by_lora_modules(hub: FakeHub) -> None:
    adapter = HubRepo("org/nope", None, "LORA_MODULES", "LORA_MODULES adapter 'sql=org/nope'")

    message = refusal(hub, adapter, None)

    assert message.startswith("LORA_MODULES adapter 'sql=org/nope' does not exist")
    assert "check LORA_MODULES" in message


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_hub_error_does_not_fail_the_preflight(hub: FakeHub, status: int) -> None:
    hub.fail(status)

    with pytest.raises(HubUnreachable):
        preflight(model_repo("org/model"), None, hub.url)


def test_a_refused_connection_does_not_fail_the_preflight(hub: FakeHub) -> None:
    hub.close()
    started = time.monotonic()

    with pytest.raises(HubUnreachable):
        preflight(model_repo("org/model"), None, hub.url)
    assert time.monotonic() - started < FATAL_WITHIN_S


def test_the_listing_is_retried_until_the_hub_answers(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight_module, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    hub.fail(503, times=2)

    listing = list_with_retries(model_repo("org/model"), None, hub.url)

    assert listing.commit == hub.repos["org/model"].commit
    assert hub.requests["GET /api/models/org/model"] == 3


def test_a_hub_that_never_answers_fails_naming_hf_endpoint(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight_module, "RETRY_WAITS_S", (0.0, 0.0))
    hub.fail(503)

    with pytest.raises(StartupError, match=r"could not be reached to fetch MODEL_NAME 'org/model'.*HF_ENDPOINT"):
        list_with_retries(model_repo("org/model"), None, hub.url)
    assert hub.requests["GET /api/models/org/model"] == 3


def test_a_fatal_answer_is_not_retried(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight_module, "RETRY_WAITS_S", (0.0, 0.0))

    with pytest.raises(StartupError, match="does not exist"):
        list_with_retries(model_repo("org/missing"), None, hub.url)
    assert hub.total_requests == 1
