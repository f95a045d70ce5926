"""Find a model that someone else put in the cache: RunPod's cached models, a volume filled by hand.

RunPod places the model an endpoint selects under
`/runpod-volume/huggingface-cache/hub/models--ORG--NAME/snapshots/SHA/`
before the worker starts, and recommends serving it offline. Such a snapshot
has the Hub cache's layout but not necessarily what huggingface_hub writes
beside its own downloads: no `trees/SHA.json` listing (which
`download.find_complete_snapshot` needs to prove a snapshot complete),
perhaps no `refs/main`, and the folder name may be lower-cased
(`models--gensyn--qwen2.5-0.5b-instruct`).

So a snapshot without this image's listing is judged by its files: a
config.json and every weight file one of its indexes names (or, unsharded,
at least one weight file). A snapshot that does have a listing was downloaded by
this image, and the listing alone decides whether it is complete: a partial
download is never mistaken for a pre-cached model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

from app.lifecycle.download import Snapshot

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "params.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
INDEX_PATTERNS = ("*.safetensors.index.json", "*.bin.index.json")


def find_precached_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Snapshot | None:
    """A complete snapshot of this revision placed in the cache without this image's listing; no network."""
    storage = _storage_folder(cache_dir / "hub", repo_id)
    if storage is None:
        return None
    commit = _commit(storage, revision)
    if commit is None:
        return None
    if (storage / "trees" / f"{commit}.json").is_file():
        return None  # downloaded by this image: its listing decides (download.find_complete_snapshot)
    snapshot = storage / "snapshots" / commit
    if not _looks_complete(snapshot):
        return None
    logger.info("using a pre-cached snapshot", extra={"repo": repo_id, "snapshot": str(snapshot)})
    return Snapshot(path=snapshot, commit=commit)


def _storage_folder(hub_cache: Path, repo_id: str) -> Path | None:
    """`models--ORG--NAME`, or the same name in another case (RunPod lower-cases it)."""
    wanted = repo_folder_name(repo_id=repo_id, repo_type="model")
    if (hub_cache / wanted).is_dir():
        return hub_cache / wanted
    try:
        matches = sorted(p for p in hub_cache.iterdir() if p.name.lower() == wanted.lower() and p.is_dir())
    except OSError:
        return None
    return matches[0] if matches else None


def _commit(storage: Path, revision: str | None) -> str | None:
    ref = revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(ref):
        return ref
    ref_file = storage / "refs" / ref
    if ref_file.is_file():
        return ref_file.read_text().strip()
    if revision is not None:
        return None  # a named branch or tag that nothing recorded: only the Hub can resolve it
    try:
        snapshots = [p for p in (storage / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    if not snapshots:
        return None
    newest = max(snapshots, key=lambda p: p.stat().st_mtime)
    if len(snapshots) > 1:
        logger.warning(
            "several snapshots and no refs/main: serving the newest; set MODEL_REVISION to choose",
            extra={"storage": str(storage), "snapshot": newest.name},
        )
    return newest.name


def _looks_complete(snapshot: Path) -> bool:
    if not any((snapshot / name).is_file() for name in CONFIG_FILES):
        return False
    indexes = [index for pattern in INDEX_PATTERNS for index in snapshot.glob(pattern)]
    if indexes:
        # Repositories that ship both formats have two indexes; the engine needs one complete set.
        return any(_index_complete(snapshot, index) for index in indexes)
    return any(path.is_file() for pattern in WEIGHT_PATTERNS for path in snapshot.glob(pattern))


def _index_complete(snapshot: Path, index: Path) -> bool:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(weight_map) and all((snapshot / name).is_file() for name in set(weight_map.values()))
