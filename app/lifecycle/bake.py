"""Download a model into the image at build time: the `baked` target of the Dockerfile.

    python -m app.lifecycle.bake ORG/NAME REVISION /opt/model

A baked image starts with no network and no Hub at all (RunPod Serverless
without a network volume, air-gapped hosts). The download is the one the
supervisor makes at start-up, only earlier: the same preflight (a missing
repository, a gated model without a token or a bad revision fail the build
with the same one-sentence fix) and the same choice of files (no `.bin`
copies beside `.safetensors`).

The Hub token comes from the BuildKit secret `hf_token`, a file mounted for
this one build step: never from an environment variable or a build argument,
which `docker history` would show. It is read here and handed to
huggingface_hub in memory; nothing writes it to disk, and the library's
cache folder in the model directory is removed afterwards.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import disable_progress_bars

from app.lifecycle.download import weight_ignore_patterns
from app.lifecycle.preflight import HubRepo, HubUnreachable, hub_endpoint, list_with_retries, preflight
from app.lifecycle.startup_errors import StartupError

TOKEN_SECRET = Path("/run/secrets/hf_token")


def read_token(path: Path | None = None) -> str | None:
    try:
        token = (path or TOKEN_SECRET).read_text().strip()
    except OSError:
        return None
    return token or None


def bake(repo_id: str, revision: str | None, target: Path, token: str | None) -> str:
    """Download the files the engine needs into `target`; returns the commit baked."""
    endpoint = hub_endpoint()
    repo = HubRepo(repo_id=repo_id, revision=revision, setting="BAKE_MODEL", label=f"BAKE_MODEL '{repo_id}'")
    try:
        listing = preflight(repo, token, endpoint)
    except HubUnreachable:
        listing = list_with_retries(repo, token, endpoint)
    disable_progress_bars()
    snapshot_download(
        repo_id,
        revision=listing.commit,
        local_dir=target,
        token=token or False,
        endpoint=endpoint,
        ignore_patterns=weight_ignore_patterns(f.path for f in listing.files),
    )
    shutil.rmtree(target / ".cache", ignore_errors=True)
    return listing.commit


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0]:
        print("usage: python -m app.lifecycle.bake ORG/NAME REVISION TARGET_DIR "
              "(set --build-arg BAKE_MODEL=org/name to bake a model)", file=sys.stderr)
        return 2
    repo_id, revision, target = argv
    try:
        commit = bake(repo_id, None if revision in ("", "main") else revision, Path(target), read_token())
    except StartupError as error:
        hint = " At build time the token is the secret hf_token: --secret id=hf_token,src=FILE, or " \
            "build_and_push.sh --hf-token-file FILE." if "HF_TOKEN" in str(error) else ""
        print(f"bake: {error}{hint}", file=sys.stderr)
        return 1
    print(f"bake: {repo_id} at {commit} in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
