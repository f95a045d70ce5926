"""Check, before any download, that the model can be fetched at all.

A typo in MODEL_NAME, a revision that does not exist or a missing HF_TOKEN for
a gated model would otherwise surface minutes later, deep inside a download or
the engine's start-up, as a traceback. One metadata request (a second one only
for gated models) answers all three within seconds; its failure becomes one
sentence that names the variable to fix. The same request lists the files with
their sizes, which the download uses to pick the weights and report progress.

When the Hub cannot be reached (network error, timeout, 429, 5xx) the check
steps aside with `HubUnreachable`: the download then tries for itself.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import OfflineModeIsEnabled

from app.lifecycle.startup_errors import StartupError

logger = logging.getLogger(__name__)

# A fatal answer needs at most two requests (plus huggingface_hub's own 3 s telemetry look-up
# unless HF_HUB_DISABLE_TELEMETRY is set), so it arrives within 15 s.
REQUEST_TIMEOUT_S = 5.0
# Waits between listing attempts once the preflight found the Hub unreachable.
RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass(frozen=True)
class HubRepo:
    """A Hub repository to fetch, with the words that tell the user where it was configured."""

    repo_id: str
    revision: str | None  # None: the default branch
    setting: str  # the variable that names it: MODEL_NAME or LORA_MODULES
    label: str  # how messages name it, e.g. "MODEL_NAME 'org/x'"


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    etag: str  # the blob's name in the cache: sha256 for LFS files, else the git blob id


@dataclass(frozen=True)
class RepoListing:
    repo: HubRepo
    commit: str
    files: tuple[RemoteFile, ...]


class HubUnreachable(Exception):
    """The Hub gave no usable answer (network, timeout, 429, 5xx); not a configuration problem."""


def hub_endpoint() -> str:
    """HF_ENDPOINT at call time (huggingface_hub itself reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def preflight(repo: HubRepo, token: str | None, endpoint: str) -> RepoListing:
    """One check of repository, revision and token; raises StartupError or HubUnreachable."""
    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(
            repo.repo_id,
            revision=repo.revision,
            files_metadata=True,
            token=token or False,
            timeout=REQUEST_TIMEOUT_S,
        )
        files = tuple(
            RemoteFile(
                path=sibling.rfilename,
                size=sibling.size or 0,
                etag=sibling.lfs.sha256 if sibling.lfs else (sibling.blob_id or ""),
            )
            for sibling in info.siblings or ()
        )
        if info.gated and files:
            # Gated repositories show their metadata to everyone; only a file tells whether the token has access.
            # The largest file is a weights file, certainly behind the gate (a model card may not be).
            probe = max(files, key=lambda f: f.size)
            url = hf_hub_url(repo.repo_id, probe.path, revision=info.sha, endpoint=endpoint)
            get_hf_file_metadata(url, token=token or False, timeout=REQUEST_TIMEOUT_S)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as exc:
        message = describe_hub_error(exc, repo, token_set=token is not None, endpoint=endpoint)
        if message is None:
            raise HubUnreachable(_short_reason(exc)) from exc
        raise StartupError(message) from None
    if info.sha is None:
        raise HubUnreachable(f"the Hub at {endpoint} did not return a commit for {repo.repo_id}")
    return RepoListing(repo=repo, commit=info.sha, files=files)


def list_with_retries(repo: HubRepo, token: str | None, endpoint: str) -> RepoListing:
    """The preflight again, retried with backoff; for when the first attempt found the Hub unreachable."""
    for wait_s in RETRY_WAITS_S:
        try:
            return preflight(repo, token, endpoint)
        except HubUnreachable as exc:
            logger.warning(
                "the Hub did not answer; retrying",
                extra={"repo": repo.repo_id, "reason": str(exc), "retry_in_s": wait_s},
            )
            time.sleep(wait_s)
    try:
        return preflight(repo, token, endpoint)
    except HubUnreachable as exc:
        raise StartupError(
            f"The Hub at {endpoint} could not be reached to fetch {repo.label} ({exc}): "
            "check the network connection and HF_ENDPOINT."
        ) from None


def describe_hub_error(exc: Exception, repo: HubRepo, *, token_set: bool, endpoint: str) -> str | None:
    """The one sentence for a Hub answer that the user must act on; None when it is worth retrying."""
    if isinstance(exc, OfflineModeIsEnabled):
        return (
            f"HF_HUB_OFFLINE is set but {repo.label} is not complete in the cache: "
            "unset HF_HUB_OFFLINE, or fill the cache (HF_HOME) before starting."
        )
    if isinstance(exc, GatedRepoError):
        refused = "the current token was refused" if token_set else "no HF_TOKEN is set"
        return (
            f"{repo.label} is gated or private: set HF_TOKEN to a token with access ({refused}; "
            "a gated model's terms must be accepted on its Hub page with the token's account)."
        )
    if isinstance(exc, RevisionNotFoundError):
        if repo.revision is None:
            return f"{repo.label} has no 'main' branch on the Hub ({endpoint}): check {repo.setting}."
        return (
            f"MODEL_REVISION '{repo.revision}' does not exist for {repo.repo_id}: "
            "set MODEL_REVISION to an existing branch, tag or commit, or unset it to use main."
        )
    if isinstance(exc, RepositoryNotFoundError):
        if token_set:
            return (
                f"{repo.label} does not exist on the Hub ({endpoint}), or HF_TOKEN has no access to it: "
                f"check {repo.setting} and the token's permissions."
            )
        return (
            f"{repo.label} does not exist on the Hub ({endpoint}), or it is private and no HF_TOKEN is set: "
            f"check {repo.setting}, or set HF_TOKEN for a private model."
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        if status == 429 or status >= 500:
            return None
        if status == 401:
            return (
                "HF_TOKEN was refused by the Hub as invalid or expired: "
                "set HF_TOKEN to a valid token, or unset it for a public model."
            )
        if status == 403:
            return (
                f"HF_TOKEN has no permission to read {repo.label}: "
                "give the token read access to it, or use another token."
            )
        return f"The Hub ({endpoint}) answered HTTP {status} for {repo.label}: check {repo.setting}."
    return None


def _short_reason(exc: Exception) -> str:
    if isinstance(exc, HfHubHTTPError):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__
