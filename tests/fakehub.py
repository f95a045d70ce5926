"""A test double for the Hugging Face Hub, which cannot be reached from the test machines.

It serves model directories over the part of the Hub's HTTP API that
huggingface_hub 2.4 uses for `model_info`, `list_repo_tree`, `hf_hub_download`
and `snapshot_download`:

- GET  /api/models/{repo}[/revision/{rev}]   metadata, with file sizes and blob ids
- GET  /api/models/{repo}/tree/{rev}         the file listing (one page)
- HEAD/GET /{repo}/resolve/{rev}/{path}      files, with ETag, X-Repo-Commit, Content-Length, Range

Errors carry the headers huggingface_hub maps to its exceptions (X-Error-Code
RepoNotFound / GatedRepo / RevisionNotFound, X-Error-Message for a refused
token), with the status codes the Hub uses: 401 without a token, 404 or 403
with one. It runs on 127.0.0.1 on an ephemeral port in a background thread;
point huggingface_hub at it with HF_ENDPOINT=hub.url.

`declared_sizes` makes the metadata report other file sizes than the files'
(a model of terabytes, for a test that must refuse it before any download).

Knobs for tests: count requests (total, per "METHOD path") and file bytes
served; cut or stall the next file response longer than N bytes after N
bytes; throttle file
bytes; answer requests with a status (5xx) with fail(); close() makes the
port refuse connections.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants

LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf"}
BLOCK = 256 * 1024
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

API_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class ServedFile:
    path: str
    local: Path
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass
class ServedRepo:
    repo_id: str
    files: dict[str, ServedFile]
    commit: str
    gated: bool = False
    private: bool = False


def scan_directory(repo_id: str, directory: Path, *, gated: bool = False, private: bool = False) -> ServedRepo:
    files: dict[str, ServedFile] = {}
    for local in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = local.read_bytes()
        path = local.relative_to(directory).as_posix()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        sha256 = hashlib.sha256(data).hexdigest() if local.suffix in LFS_SUFFIXES else None
        files[path] = ServedFile(path=path, local=local, size=len(data), blob_id=blob_id, sha256=sha256)
    commit = hashlib.sha1("".join(f"{f.path}:{f.etag}\n" for f in files.values()).encode()).hexdigest()
    return ServedRepo(repo_id=repo_id, files=files, commit=commit, gated=gated, private=private)


class FakeHub:
    """Serves `repos` (repo id -> directory). `tokens` maps each valid token to the gated/private repos it may read."""

    def __init__(
        self,
        repos: dict[str, Path],
        *,
        gated: set[str] | frozenset[str] = frozenset(),
        private: set[str] | frozenset[str] = frozenset(),
        tokens: dict[str, set[str]] | None = None,
        declared_sizes: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.repos = {
            repo_id: scan_directory(repo_id, directory, gated=repo_id in gated, private=repo_id in private)
            for repo_id, directory in repos.items()
        }
        self.tokens = tokens or {}
        self.declared_sizes = declared_sizes or {}
        self.fail_status: int | None = None
        self.fail_remaining: int | None = None
        self.cut_after_bytes: int | None = None
        self.stall_after_bytes: int | None = None
        self.bytes_per_second: float | None = None
        self.requests: Counter[str] = Counter()
        self.bytes_served: Counter[str] = Counter()  # file bytes sent, by repo path
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fakehub", daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()

    def fail(self, status: int, times: int | None = None) -> None:
        """Answer the next `times` requests (all when None) with `status`."""
        with self._lock:
            self.fail_status, self.fail_remaining = status, times

    def close(self) -> None:
        """Stop serving; the port then refuses connections."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- used by the handler ------------------------------------------------
    def _take_failure(self) -> int | None:
        with self._lock:
            status = self.fail_status
            if status is not None and self.fail_remaining is not None:
                self.fail_remaining -= 1
                if self.fail_remaining <= 0:
                    self.fail_status = self.fail_remaining = None
            return status

    def _take_interruption(self, length: int) -> tuple[int | None, str]:
        """The one-shot cut or stall for the next file response longer than its byte limit."""
        with self._lock:
            if self.cut_after_bytes is not None and length > self.cut_after_bytes:
                limit, self.cut_after_bytes = self.cut_after_bytes, None
                return limit, "cut"
            if self.stall_after_bytes is not None and length > self.stall_after_bytes:
                limit, self.stall_after_bytes = self.stall_after_bytes, None
                return limit, "stall"
        return None, ""

    def _count(self, key: str) -> None:
        with self._lock:
            self.requests[key] += 1

    def _add_bytes(self, path: str, count: int) -> None:
        with self._lock:
            self.bytes_served[path] += count


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        # Tests kill clients mid-response on purpose; their connection resets are not errors.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        # --- routing ---------------------------------------------------------
        def _serve(self, head: bool) -> None:
            path = urlsplit(self.path).path
            hub._count(f"{self.command} {unquote(path)}")
            if (status := hub._take_failure()) is not None:
                self._error(status, None, "Internal Error - We're working hard to fix this as soon as possible!")
                return
            token = self._token()
            if token is not None and token not in hub.tokens:
                self._error(401, None, INVALID_TOKEN_MESSAGE)
                return
            if match := RESOLVE_ROUTE.match(path):
                self._resolve(match, token, head)
            elif match := TREE_ROUTE.match(path):
                self._tree(match, token)
            elif match := API_ROUTE.match(path):
                self._model_info(match, token)
            else:
                self._error(404, None, "Not found")

        def _token(self) -> str | None:
            value = self.headers.get("Authorization", "")
            return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else None

        def _repo(self, repo_id: str, token: str | None) -> ServedRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._allowed(repo, token)):
                # The Hub does not reveal private repositories: they look missing.
                self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _allowed(self, repo: ServedRepo, token: str | None) -> bool:
            return token is not None and repo.repo_id in hub.tokens.get(token, set())

        def _commit(self, repo: ServedRepo, revision: str | None) -> str | None:
            rev = unquote(revision) if revision else "main"
            if rev in ("main", repo.commit):
                return repo.commit
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None

        # --- endpoints -------------------------------------------------------
        def _model_info(self, match: re.Match[str], token: str | None) -> None:
            repo = self._repo(match["repo"], token)
            if repo is None or (commit := self._commit(repo, match["rev"])) is None:
                return
            siblings = []
            for f in repo.files.values():
                size = hub.declared_sizes.get(repo.repo_id, {}).get(f.path, f.size)
                sibling: dict[str, object] = {"rfilename": f.path, "size": size, "blobId": f.blob_id}
                if f.sha256:
                    sibling["lfs"] = {"size": size, "sha256": f.sha256, "pointerSize": 134}
                siblings.append(sibling)
            self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": siblings,
                }
            )

        def _tree(self, match: re.Match[str], token: str | None) -> None:
            repo = self._repo(match["repo"], token)
            if repo is None or self._commit(repo, match["rev"]) is None:
                return
            entries = []
            for f in repo.files.values():
                size = hub.declared_sizes.get(repo.repo_id, {}).get(f.path, f.size)
                entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": size, "path": f.path}
                if f.sha256:
                    entry["lfs"] = {"oid": f.sha256, "size": size, "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, match: re.Match[str], token: str | None, head: bool) -> None:
            repo = self._repo(match["repo"], token)
            if repo is None or (commit := self._commit(repo, match["rev"])) is None:
                return
            if repo.gated and not self._allowed(repo, token):
                self._error(
                    401 if token is None else 403,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
                )
                return
            file = repo.files.get(unquote(match["path"]))
            if file is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            start = self._range_start(file.size)
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{file.etag}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(file.size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{file.size - 1}/{file.size}")
            self.end_headers()
            if not head:
                self._send_file(file, start)

        def _range_start(self, size: int) -> int:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(match[1]) if match else 0
            return start if start < size else 0

        def _send_file(self, file: ServedFile, start: int) -> None:
            limit, interruption = hub._take_interruption(file.size - start)
            sent = 0
            with file.local.open("rb") as data:
                data.seek(start)
                while block := data.read(BLOCK):
                    if limit is not None and sent + len(block) > limit:
                        block = block[: limit - sent]
                    self.wfile.write(block)
                    self.wfile.flush()
                    sent += len(block)
                    hub._add_bytes(file.path, len(block))
                    if limit is not None and sent >= limit:
                        break
                    if hub.bytes_per_second:
                        time.sleep(len(block) / hub.bytes_per_second)
            if interruption == "stall":
                hub._closing.wait()
            if interruption:
                self.close_connection = True

        # --- responses -------------------------------------------------------
        def _json(self, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def hub_environment(hub: FakeHub) -> dict[str, str]:
    """Environment for a process that talks to this hub (and skips the telemetry look-up at huggingface.co)."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}


def use_in_process(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process at the hub; huggingface_hub read its telemetry switch at import, so set that too."""
    for name, value in hub_environment(hub).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
