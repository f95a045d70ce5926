"""Make the model and its LoRA adapters available on local disk before the engine starts.

The supervisor calls `prepare_model` in a worker thread. The order of checks
is what makes restarts cheap and failures quick:

1. A local directory (MODEL_NAME, or a LORA_MODULES target) is used as it is.
2. A snapshot that is complete in the cache is used without any network
   request, so a second start works offline; so is one that RunPod (or
   anyone) placed in the cache without this image's metadata (precached.py).
3. Otherwise one preflight request per repository fails fast, with one
   sentence naming the variable to fix, on a missing repository, a refused
   token or an unknown revision; a Hub that does not answer is left to the
   download, which retries.
4. The fit check (fit.py) refuses a model that cannot fit the engine's
   memory, from its config.json and the listing's file sizes, before a byte
   of its weights is fetched; a model already on disk is checked there.
5. The download fetches only the files the engine needs and resumes what an
   earlier, interrupted start left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from app.config import Settings
from app.lifecycle.download import Snapshot, download_snapshots, find_complete_snapshot
from app.lifecycle.fit import check_local_model, check_remote_model
from app.lifecycle.precached import find_precached_snapshot
from app.lifecycle.preflight import HubRepo, HubUnreachable, RepoListing, hub_endpoint, list_with_retries, preflight
from app.lifecycle.startup_errors import StartupError
from app.lifecycle.status import DownloadProgress, Phase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    path: Path  # the snapshot directory, or MODEL_NAME itself when it is a local directory
    revision: str | None  # the commit served; None for a local directory
    lora_paths: dict[str, Path]
    offline: bool  # True when nothing was fetched from the Hub


def prepare_model(
    settings: Settings,
    on_phase: Callable[[Phase], None],
    on_progress: Callable[[DownloadProgress], None],
    before_download: Callable[[], None] = lambda: None,
    model_setting: str = "MODEL_NAME",
) -> PreparedModel:
    """Local paths for the model and adapters; raises StartupError with the fix on fatal problems.

    on_phase gets PREFLIGHT and DOWNLOADING only when something has to be fetched; before_download
    is called between the Hub's listing and the first file (it may raise StartupError to stop there).
    model_setting is the variable that names the model in the sentences (MODELS in a multi-model deployment).
    """
    model = _locate(settings.MODEL_NAME, settings.MODEL_REVISION, model_setting, f"{model_setting} '{settings.MODEL_NAME}'")
    adapters = {
        name: _locate(target, None, "LORA_MODULES", f"LORA_MODULES adapter '{name}={target}'")
        for name, target in settings.lora_modules.items()
    }
    hub_repos = [source for source in (model, *adapters.values()) if isinstance(source, HubRepo)]
    snapshots: dict[HubRepo, Snapshot] = {}
    for repo in hub_repos:
        cached = find_complete_snapshot(repo.repo_id, repo.revision, settings.cache_dir) or find_precached_snapshot(
            repo.repo_id, repo.revision, settings.cache_dir
        )
        if cached is not None:
            snapshots[repo] = cached
    missing = [repo for repo in hub_repos if repo not in snapshots]
    if missing:
        snapshots.update(_fetch(missing, settings, on_phase, on_progress, before_download))

    def local_path(source: HubRepo | Path) -> Path:
        return snapshots[source].path if isinstance(source, HubRepo) else source

    prepared = PreparedModel(
        path=local_path(model),
        revision=snapshots[model].commit if isinstance(model, HubRepo) else None,
        lora_paths={name: local_path(source) for name, source in adapters.items()},
        offline=not missing,
    )
    if model not in missing:  # a fetched model was checked before its download
        check_local_model(settings, prepared.path)
    logger.info(
        "model ready on disk",
        extra={"model_path": str(prepared.path), "revision": prepared.revision, "offline": prepared.offline},
    )
    return prepared


def _locate(name: str, revision: str | None, setting: str, label: str) -> HubRepo | Path:
    if Path(name).is_dir():
        return Path(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise StartupError(
            f"{label} is neither a local directory nor a Hub model id like org/name: "
            f"check {setting} (for a local model, is its volume mounted?)."
        ) from None
    return HubRepo(repo_id=name, revision=revision, setting=setting, label=label)


def _fetch(
    repos: list[HubRepo],
    settings: Settings,
    on_phase: Callable[[Phase], None],
    on_progress: Callable[[DownloadProgress], None],
    before_download: Callable[[], None],
) -> dict[HubRepo, Snapshot]:
    token = settings.HF_TOKEN.get_secret_value() if settings.HF_TOKEN else None
    endpoint = hub_endpoint()
    on_phase(Phase.PREFLIGHT)
    listings: dict[HubRepo, RepoListing | None] = {}
    for repo in repos:
        try:
            listings[repo] = preflight(repo, token, endpoint)
        except HubUnreachable as exc:
            logger.warning(
                "preflight could not reach the Hub; the download will retry",
                extra={"repo": repo.repo_id, "reason": str(exc)},
            )
            listings[repo] = None
    complete = [listing or list_with_retries(repo, token, endpoint) for repo, listing in listings.items()]
    for listing in complete:
        if listing.repo.setting == "MODEL_NAME":
            check_remote_model(settings, listing, token, endpoint)
    before_download()
    on_phase(Phase.DOWNLOADING)
    snapshots = download_snapshots(
        complete, cache_dir=settings.cache_dir, token=token, endpoint=endpoint, on_progress=on_progress
    )
    return {listing.repo: snapshot for listing, snapshot in zip(complete, snapshots, strict=True)}
