"""The full engine-flag check's verdict, kept on the volume so that a restart does not run it again.

The full check (flag_check.py) has the pinned vLLM's own parser judge the
engine's command line in a child process: 20-30 s of CPU on a small machine,
spent beside the engine's own load on every start. Its verdict depends only
on what the check reads, so it is kept beside the compile cache
(`<cache_dir>/vllm-flag-checks/<vllm version>/<digest>.json`, next to
`vllm-cache`, whose version folders hold only compile-cache folders) under a
key made of exactly that:

- the installed vLLM's version and the plugins it loads (`vllm.general_plugins`
  entry points: they may register parsers and loaders);
- the device the engine runs on;
- the command line the check judges (`check_argv`);
- the variables of the check's environment that it reads: the image's settings
  (they build the command line and name the setting in a refusal) and vLLM's
  own `VLLM_*` variables. Variables that differ from container to container
  and that neither reads (hostname, platform ids) stay out, so a new worker on
  the same volume finds the verdict too.

A changed flag, setting or vLLM version gives another key, and the check runs
again. Only a verdict the check reached is kept (a crash or a timeout is
not). A file that cannot be read or parsed, or a volume that cannot be
written, costs the check and a warning, never the start. The file holds the
verdict and the vLLM version, not the key's values (a setting may be private).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from app.config import Settings

logger = logging.getLogger(__name__)

FOLDER = "vllm-flag-checks"
PLUGIN_GROUP = "vllm.general_plugins"


@dataclass(frozen=True)
class Verdict:
    """What the full check concluded: the refusal sentence, or None when it accepted the command line."""

    refusal: str | None


def verdict_key(
    *, version: str, plugins: Sequence[str], device: str, argv: Sequence[str], env: Mapping[str, str]
) -> dict[str, object]:
    """The check's inputs; `env` is the check's whole environment, of which only what it reads is kept."""
    settings = {name.upper() for name in Settings.model_fields}
    read = {name: value for name, value in env.items() if name.upper() in settings or name.upper().startswith("VLLM_")}
    return {"vllm": version, "plugins": sorted(plugins), "device": device, "argv": list(argv),
            "env": dict(sorted(read.items()))}


def installed_plugins() -> list[str]:
    """`name=module:function` of every vLLM general plugin installed (tens of milliseconds: a metadata scan)."""
    return sorted(f"{point.name}={point.value}" for point in metadata.entry_points(group=PLUGIN_GROUP))


def verdict_path(cache_dir: Path, key: Mapping[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    version = "".join(c if c.isalnum() or c in "._-" else "-" for c in str(key["vllm"]))
    return cache_dir / FOLDER / version / f"{digest}.json"


def load_verdict(path: Path) -> Verdict | None:
    """The kept verdict, or None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text())
        refusal = data["refusal"]
        if refusal is not None and not isinstance(refusal, str):
            raise ValueError("refusal is neither null nor a sentence")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("a kept engine-flag verdict cannot be read; the full check runs again",
                       extra={"path": str(path), "reason": f"{type(exc).__name__}: {exc}"})
        return None
    return Verdict(refusal)


def store_verdict(path: Path, verdict: Verdict, version: str) -> None:
    """Write atomically (a concurrent reader sees the old file or the new one); a failure is only logged."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as file:
            temporary = file.name
            json.dump({"vllm": version, "refusal": verdict.refusal}, file)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        logger.warning("the engine-flag verdict cannot be kept on the volume; the next start checks again",
                       extra={"path": str(path), "reason": f"{type(exc).__name__}: {exc.strerror or exc}"})


async def kept_or_checked(path: Path, version: str, check: Callable[[], Awaitable[Verdict | None]]) -> Verdict | None:
    """The verdict kept at `path`; else `check()`'s, kept for the next start. None: the check could not run."""
    if (kept := await asyncio.to_thread(load_verdict, path)) is not None:
        logger.info("engine flags already checked with this configuration", extra={"path": str(path)})
        return kept
    verdict = await check()
    if verdict is not None:
        await asyncio.to_thread(store_verdict, path, verdict, version)
    return verdict
