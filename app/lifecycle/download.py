"""Fetch model snapshots into the Hugging Face cache, and find complete ones offline.

huggingface_hub does the transfer (hf_xet when the repository uses Xet storage,
plain HTTP otherwise) into the standard cache layout
`hub/models--ORG--NAME/snapshots/SHA`, which RunPod's model cache and every HF
tool understand. This module adds what a server start needs on top:

- Only the weights the engine loads: when a repository ships safetensors, its
  duplicate .bin/.pt/.msgpack/.h5/.onnx/.gguf copies are skipped.
- Resuming across processes. huggingface_hub >= 1.18 restarts a file whose
  download process was killed and leaves its partial `<etag>.<id>.incomplete`
  blob behind; a container restarted mid-download would start over. Before
  the library runs, each such partial is continued with a Range request and
  moved into place, so the library finds the blob done.
- A cache check that needs no network: huggingface_hub records each commit's
  file listing (`trees/SHA.json`); a snapshot holding every selected file of
  that listing is complete.
- Progress for the status file and rate-limited JSON log records.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx2
from huggingface_hub import get_cached_repo_tree, hf_hub_url, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.file_download import REGEX_COMMIT_HASH, http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, disable_progress_bars, filter_repo_objects
from huggingface_hub.utils.sha import sha_fileobj

from app.lifecycle.preflight import HubRepo, RemoteFile, RepoListing, describe_hub_error
from app.lifecycle.startup_errors import StartupError
from app.lifecycle.status import DownloadProgress

logger = logging.getLogger(__name__)

SAFETENSORS = "*.safetensors"
TORCH_WEIGHTS = ("*.bin", "*.pt", "*.pth")
OTHER_FRAMEWORK_WEIGHTS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.gguf")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
GiB = 1024**3


@dataclass(frozen=True)
class Snapshot:
    path: Path
    commit: str


def weight_ignore_patterns(filenames: Iterable[str]) -> list[str]:
    """Patterns of the weight copies the engine will not load, given everything the repository holds."""
    names = list(filenames)
    if any(filter_repo_objects(names, allow_patterns=[SAFETENSORS])):
        return [*TORCH_WEIGHTS, *OTHER_FRAMEWORK_WEIGHTS]
    if any(filter_repo_objects(names, allow_patterns=list(TORCH_WEIGHTS))):
        return list(OTHER_FRAMEWORK_WEIGHTS)
    return []


def select_files(paths: Iterable[str]) -> list[str]:
    """The files of a repository worth downloading."""
    names = list(paths)
    return list(filter_repo_objects(names, ignore_patterns=weight_ignore_patterns(names)))


def find_complete_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Snapshot | None:
    """The cached snapshot of this revision if it holds every file we would download; no network."""
    hub_cache = cache_dir / "hub"
    storage = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(ref):
        commit = ref
    else:
        ref_file = storage / "refs" / ref
        if not ref_file.is_file():
            return None
        commit = ref_file.read_text().strip()
    try:
        listing = get_cached_repo_tree(repo_id, revision=commit, cache_dir=hub_cache)
    except CachedRepoTreeNotFoundError:
        return None
    snapshot = storage / "snapshots" / commit
    if not all((snapshot / path).is_file() for path in select_files(f.path for f in listing)):
        return None
    return Snapshot(path=snapshot, commit=commit)


def download_snapshots(
    listings: Sequence[RepoListing],
    *,
    cache_dir: Path,
    token: str | None,
    endpoint: str,
    on_progress: Callable[[DownloadProgress], None],
    poll_interval_s: float = 1.0,
    log_interval_s: float = 5.0,
) -> list[Snapshot]:
    """Download the selected files of each listing; one Snapshot per listing, in order.

    on_progress is called from a background thread, every poll_interval_s and once at the end.
    Raises StartupError with the fix when a download cannot finish.
    """
    hub_cache = cache_dir / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    plan = [(listing, _selected(listing)) for listing in listings]
    meter = _ProgressMeter(hub_cache, plan, on_progress, poll_interval_s, log_interval_s)
    _check_free_space(hub_cache, meter.bytes_total - meter.measure(), [listing.repo for listing in listings])
    # We report progress ourselves; tqdm bars would only clutter the JSON logs.
    disable_progress_bars()
    # hf_xet reads this when its session starts: more parallel transfers on a server.
    os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    snapshots = []
    with meter:
        for listing, files in plan:
            try:
                _resume_partial_blobs(hub_cache, listing, files, token, endpoint)
                path = snapshot_download(
                    listing.repo.repo_id,
                    revision=listing.commit,
                    cache_dir=hub_cache,
                    token=token or False,
                    endpoint=endpoint,
                    ignore_patterns=weight_ignore_patterns(f.path for f in listing.files),
                )
            except (HfHubHTTPError, httpx2.TransportError, LocalEntryNotFoundError, OSError) as exc:
                logger.warning("download failed", exc_info=True, extra={"repo": listing.repo.repo_id})
                raise StartupError(_describe_failure(exc, listing.repo, hub_cache, token, endpoint)) from None
            _record_ref(_storage(hub_cache, listing.repo.repo_id), listing.repo.revision, listing.commit)
            snapshots.append(Snapshot(path=Path(path), commit=listing.commit))
    return snapshots


def _selected(listing: RepoListing) -> list[RemoteFile]:
    keep = set(select_files(f.path for f in listing.files))
    return [f for f in listing.files if f.path in keep]


def _storage(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _partial_blobs(blobs: Path) -> dict[str, list[Path]]:
    """Partial downloads by etag: `<etag>.incomplete` (older versions) or `<etag>.<id>.incomplete`."""
    partials: dict[str, list[Path]] = {}
    if blobs.is_dir():
        for path in blobs.glob("*.incomplete"):
            partials.setdefault(path.name.split(".", 1)[0], []).append(path)
    return partials


def _record_ref(storage: Path, revision: str | None, commit: str) -> None:
    """Point refs/<branch or tag> at the commit, as huggingface_hub does, so the next start resolves it offline.

    The download is pinned to the commit the preflight saw (a branch may move meanwhile), so the
    library itself never writes this ref.
    """
    ref = revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(ref):
        return
    ref_file = storage / "refs" / ref
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_file.with_name(f"{ref_file.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_file)


def _blob_sizes(blobs: Path) -> tuple[set[str], dict[str, int]]:
    """Etags of the complete blobs, and the size of the largest partial of each other etag."""
    complete: set[str] = set()
    partial: dict[str, int] = {}
    if not blobs.is_dir():
        return complete, partial
    for entry in os.scandir(blobs):
        try:
            size = entry.stat().st_size
        except FileNotFoundError:  # a partial renamed into place meanwhile
            continue
        etag, _, suffix = entry.name.partition(".")
        if not suffix:
            complete.add(etag)
        elif suffix.endswith("incomplete"):
            partial[etag] = max(partial.get(etag, 0), size)
    return complete, partial


def _resume_partial_blobs(
    hub_cache: Path, listing: RepoListing, files: Sequence[RemoteFile], token: str | None, endpoint: str
) -> None:
    """Continue the partial blobs a killed process left, so the library finds them complete."""
    blobs = _storage(hub_cache, listing.repo.repo_id) / "blobs"
    by_etag = {f.etag: f for f in files}
    partials = {etag: paths for etag, paths in _partial_blobs(blobs).items() if etag in by_etag}
    if not partials:
        return
    headers = build_hf_headers(token=token or False)

    def resume(etag: str) -> None:
        file = by_etag[etag]
        # The library holds this lock while it downloads a blob: a partial seen under it belongs to no live process.
        lock = hub_cache / ".locks" / blobs.parent.name / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(str(lock)):
            candidates = sorted((p for p in partials[etag] if p.exists()), key=lambda p: p.stat().st_size)
            blob = blobs / etag
            if blob.exists() or not candidates:
                for stale in candidates:
                    stale.unlink(missing_ok=True)
                return
            *stale, partial = candidates
            for path in stale:
                path.unlink(missing_ok=True)
            url = hf_hub_url(listing.repo.repo_id, file.path, revision=listing.commit, endpoint=endpoint)
            _continue_blob(partial, blob, file, url, headers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(resume, partials))


def _continue_blob(partial: Path, blob: Path, file: RemoteFile, url: str, headers: dict[str, str]) -> None:
    offset = partial.stat().st_size
    if offset > file.size:
        partial.unlink()
        return
    logger.info(
        "resuming a partial download",
        extra={"file": file.path, "bytes_present": offset, "bytes_total": file.size},
    )
    with partial.open("ab") as out:
        http_get(url, out, resume_size=offset, headers=headers, expected_size=file.size)
    # A partial written by hf_xet need not be a prefix of the file: only keep what checks out.
    if SHA256_HEX.fullmatch(file.etag):
        with partial.open("rb") as data:
            digest = sha_fileobj(data).hex()
        if digest != file.etag:
            logger.warning(
                "a resumed download did not match its checksum; fetching it again", extra={"file": file.path}
            )
            partial.unlink()
            return
    os.replace(partial, blob)


def _check_free_space(hub_cache: Path, bytes_missing: int, repos: Sequence[HubRepo]) -> None:
    free = shutil.disk_usage(hub_cache).free
    if bytes_missing > free:
        labels = ", ".join(repo.label for repo in repos)
        raise StartupError(
            f"Not enough disk space for {labels}: {bytes_missing / GiB:.1f} GiB more are needed in {hub_cache} "
            f"but {free / GiB:.1f} GiB are free; mount a larger volume or point HF_HOME at one."
        )


def _describe_failure(exc: Exception, repo: HubRepo, hub_cache: Path, token: str | None, endpoint: str) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (
            f"The disk filled up while downloading {repo.label} into {hub_cache} (No space left on device): "
            "mount a larger volume or point HF_HOME at one; the next start resumes the download."
        )
    if isinstance(exc, HfHubHTTPError):
        described = describe_hub_error(exc, repo, token_set=token is not None, endpoint=endpoint)
        if described is not None:
            return described
        reason = f"HTTP {exc.response.status_code}"
    else:
        reason = type(exc).__name__
    return (
        f"Downloading {repo.label} from {endpoint} failed ({reason}): check the network connection and "
        "HF_ENDPOINT; the next start resumes the download where it stopped."
    )


class _ProgressMeter:
    """Progress measured on the cache's blob files, so it sees every writer (hf_xet, HTTP, the resume step)."""

    RATE_WINDOW_S = 10.0

    def __init__(
        self,
        hub_cache: Path,
        plan: Sequence[tuple[RepoListing, Sequence[RemoteFile]]],
        on_progress: Callable[[DownloadProgress], None],
        poll_interval_s: float,
        log_interval_s: float,
    ) -> None:
        self._targets = [(_storage(hub_cache, listing.repo.repo_id) / "blobs", files) for listing, files in plan]
        self._repos = [listing.repo.repo_id for listing, _ in plan]
        self.bytes_total = sum(f.size for _, files in plan for f in files)
        self._on_progress = on_progress
        self._poll_interval_s = poll_interval_s
        self._log_interval_s = log_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)
        self._samples: deque[tuple[float, int]] = deque()
        self._started = 0.0
        self._last_log = 0.0
        self._last_log_step = -1

    def measure(self) -> int:
        done = 0
        for blobs, files in self._targets:
            complete, partial = _blob_sizes(blobs)
            done += sum(f.size if f.etag in complete else partial.get(f.etag, 0) for f in files)
        return done

    def __enter__(self) -> Self:
        self._started = self._last_log = time.monotonic()
        done = self.measure()
        logger.info(
            "download started",
            extra={"repos": self._repos, "bytes_total": self.bytes_total, "bytes_present": done},
        )
        self._samples.append((self._started, done))
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        progress = self._report()
        if exc_type is None:
            seconds = round(time.monotonic() - self._started, 3)
            logger.info("download finished", extra={**progress.to_json(), "seconds": seconds})

    def _run(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            progress = self._report()
            self._log_if_due(progress)

    def _report(self) -> DownloadProgress:
        now, done = time.monotonic(), self.measure()
        self._samples.append((now, done))
        while now - self._samples[0][0] > self.RATE_WINDOW_S:
            self._samples.popleft()
        first_time, first_done = self._samples[0]
        rate = (done - first_done) / (now - first_time) if now > first_time else None
        progress = DownloadProgress(
            bytes_done=done,
            bytes_total=self.bytes_total,
            rate_bytes_s=round(rate, 1) if rate is not None else None,
        )
        self._on_progress(progress)
        return progress

    def _log_if_due(self, progress: DownloadProgress) -> None:
        """One record every log_interval_s or every 10 %, whichever comes first."""
        now = time.monotonic()
        step = int(10 * progress.bytes_done / self.bytes_total) if self.bytes_total else 10
        if now - self._last_log < self._log_interval_s and step <= self._last_log_step:
            return
        self._last_log, self._last_log_step = now, step
        logger.info("download progress", extra=progress.to_json())
