"""Models placed in the cache by someone else (RunPod's cached models), and which volume holds the cache.

RunPod's layout is built here as its documentation describes it:
`/runpod-volume/huggingface-cache/hub/models--ORG--NAME/snapshots/SHA/`, folder
names possibly lower-cased, no `trees/` listing and no `refs/`. The Hub is the
local double (tests/fakehub.py), serving the same repository, so that any
request the start made would be counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import load_settings
from app.lifecycle.download import find_complete_snapshot
from app.lifecycle.model_source import prepare_model
from app.lifecycle.precached import find_precached_snapshot
from tests.fakehub import FakeHub, use_in_process

REPO = "Org/Tiny-Model"
SHA = "317b7eb96312eda0c431d1dab1af958a308cb35e"


def runpod_snapshot(hub_cache: Path, folder: str = "models--org--tiny-model", sha: str = SHA) -> Path:
    """A snapshot as RunPod places it: blobs and symlinks, no refs, no trees."""
    storage = hub_cache / folder
    snapshot = storage / "snapshots" / sha
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in {"config.json": b'{"architectures": ["LlamaForCausalLM"]}', "model.safetensors": b"\0" * 4096}.items():
        blob = storage / "blobs" / f"{sha[:8]}-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (source / "model.safetensors").write_bytes(b"\1" * 4096)
    with FakeHub({REPO: source}) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


def test_a_lower_cased_runpod_snapshot_is_found_without_trees_or_refs(tmp_path: Path) -> None:
    snapshot = runpod_snapshot(tmp_path / "hub")

    assert find_complete_snapshot(REPO, None, tmp_path) is None  # this image's own check needs its listing
    found = find_precached_snapshot(REPO, None, tmp_path)

    assert found is not None and found.path == snapshot and found.commit == SHA


def test_refs_and_a_pinned_commit_choose_the_snapshot(tmp_path: Path) -> None:
    older = runpod_snapshot(tmp_path / "hub", sha="a" * 40)
    runpod_snapshot(tmp_path / "hub", sha="b" * 40)
    refs = tmp_path / "hub" / "models--org--tiny-model" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)

    assert find_precached_snapshot(REPO, None, tmp_path).path == older
    assert find_precached_snapshot(REPO, "b" * 40, tmp_path).commit == "b" * 40
    assert find_precached_snapshot(REPO, "v2", tmp_path) is None  # a tag nothing recorded: the Hub decides


def test_an_incomplete_sharded_snapshot_is_not_used(tmp_path: Path) -> None:
    snapshot = runpod_snapshot(tmp_path / "hub")
    (snapshot / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"\0")

    assert find_precached_snapshot(REPO, None, tmp_path) is None
    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"\0")
    assert find_precached_snapshot(REPO, None, tmp_path) is not None


def test_a_snapshot_this_image_was_downloading_is_left_to_its_listing(tmp_path: Path) -> None:
    runpod_snapshot(tmp_path / "hub")
    trees = tmp_path / "hub" / "models--org--tiny-model" / "trees"
    trees.mkdir()
    (trees / f"{SHA}.json").write_text("{}")

    assert find_precached_snapshot(REPO, None, tmp_path) is None


def test_a_runpod_cached_model_starts_with_zero_hub_requests(hub: FakeHub, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    snapshot = runpod_snapshot(volume / "huggingface-cache" / "hub")
    settings = load_settings({
        "MODEL_NAME": REPO, "CACHE_VOLUMES": f"{volume},{tmp_path / 'workspace'}", "HF_HOME": str(tmp_path / "home"),
    })

    prepared = prepare_model(settings, lambda phase: None, lambda progress: None)

    assert prepared.path == snapshot and prepared.revision == SHA and prepared.offline
    assert hub.total_requests == 0


# --- which volume holds the cache ----------------------------------------------------


def test_the_first_mounted_volume_holds_the_cache(tmp_path: Path) -> None:
    runpod, workspace, home = tmp_path / "runpod-volume", tmp_path / "workspace", tmp_path / "home"
    env = {"CACHE_VOLUMES": f"{runpod},{workspace}", "HF_HOME": str(home)}

    assert load_settings(env).cache_dir == home
    workspace.mkdir()
    assert load_settings(env).cache_dir == workspace / "huggingface-cache"  # a pod's volume
    runpod.mkdir()
    assert load_settings(env).cache_dir == runpod / "huggingface-cache"  # Serverless wins when both exist


def test_the_default_volumes_are_runpods() -> None:
    assert load_settings({}).CACHE_VOLUMES == "/runpod-volume,/workspace"


def test_a_relative_volume_path_is_refused() -> None:
    with pytest.raises(ValueError, match="CACHE_VOLUMES.*write absolute mount points"):
        load_settings({"CACHE_VOLUMES": "/runpod-volume,workspace"})
