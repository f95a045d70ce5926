"""The startup status that the supervisor publishes and the wrapper serves.

The supervisor process owns the lifecycle (preflight, download, engine
process); the wrapper processes answer /health and /ping. They share one
small JSON file, replaced atomically on every change, so any number of
wrapper workers read a consistent view without talking to each other.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

# The supervisor tells its wrapper processes where the status file is.
STATUS_FILE_ENV = "APP_STATUS_FILE"
# ... and, with MODELS, where the control socket of the models' engines is (app/lifecycle/model_engines.py).
CONTROL_SOCKET_ENV = "APP_CONTROL_SOCKET"
# Bounds on the log tail in the status file, which every probe reads.
LOG_TAIL_LINES = 20
LOG_TAIL_LINE_CHARS = 1000


class Phase(str, Enum):
    PREFLIGHT = "preflight"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    WARMUP = "warmup"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass
class DownloadProgress:
    bytes_done: int = 0
    bytes_total: int | None = None
    rate_bytes_s: float | None = None

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return round(100.0 * self.bytes_done / self.bytes_total, 1)

    @property
    def eta_s(self) -> float | None:
        if not self.bytes_total or not self.rate_bytes_s:
            return None
        return round(max(0, self.bytes_total - self.bytes_done) / self.rate_bytes_s, 1)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "percent": self.percent, "eta_s": self.eta_s}


@dataclass
class StartupStatus:
    phase: Phase = Phase.PREFLIGHT
    phase_started: float = field(default_factory=time.time)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    download: DownloadProgress = field(default_factory=DownloadProgress)
    error: str | None = None
    engine_log_tail: list[str] = field(default_factory=list)
    resolved_revision: str | None = None
    model_path: str | None = None
    engine_restarts: int = 0
    # Settings a memory retry changed, each {"setting", "from", "to", "reason"}.
    startup_adjustments: list[dict[str, object]] = field(default_factory=list)
    # With MODELS: every model's state ("unloaded", "loading", "loaded", "unloading", "failed") and error.
    models: dict[str, dict[str, object]] = field(default_factory=dict)

    def enter(self, phase: Phase, error: str | None = None, log_tail: Sequence[str] = ()) -> None:
        """Start `phase`; `error` and the engine's `log_tail` behind it replace the previous ones."""
        now = time.time()
        previous = self.phase.value
        self.phase_seconds[previous] = round(self.phase_seconds.get(previous, 0.0) + now - self.phase_started, 3)
        self.phase, self.phase_started, self.error = phase, now, error
        self.engine_log_tail = [line[:LOG_TAIL_LINE_CHARS] for line in list(log_tail)[-LOG_TAIL_LINES:]]

    def to_json(self, private: bool = False) -> dict[str, object]:
        """The status for probes; with `private`, also the engine's log tail (never for unauthenticated answers)."""
        seconds = dict(self.phase_seconds)
        seconds[self.phase.value] = round(seconds.get(self.phase.value, 0.0) + time.time() - self.phase_started, 3)
        body: dict[str, object] = {
            "phase": self.phase.value,
            "phase_seconds": seconds,
            "download": self.download.to_json(),
            "error": self.error,
            "resolved_revision": self.resolved_revision,
            "model_path": self.model_path,
            "engine_restarts": self.engine_restarts,
            "startup_adjustments": list(self.startup_adjustments),
        }
        if self.models:
            body["models"] = {name: dict(model) for name, model in self.models.items()}
        if private:
            body["engine_log_tail"] = list(self.engine_log_tail)
        return body


def write_status(path: Path, status: StartupStatus) -> None:
    payload = json.dumps({**status.to_json(private=True), "phase_started": status.phase_started}).encode()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def read_status(path: Path) -> StartupStatus | None:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    seconds = dict(data.get("phase_seconds", {}))
    seconds.pop(data["phase"], None)
    download = data.get("download") or {}
    return StartupStatus(
        phase=Phase(data["phase"]),
        phase_started=data.get("phase_started", time.time()),
        phase_seconds=seconds,
        download=DownloadProgress(
            bytes_done=download.get("bytes_done", 0),
            bytes_total=download.get("bytes_total"),
            rate_bytes_s=download.get("rate_bytes_s"),
        ),
        error=data.get("error"),
        engine_log_tail=list(data.get("engine_log_tail") or []),
        resolved_revision=data.get("resolved_revision"),
        model_path=data.get("model_path"),
        engine_restarts=data.get("engine_restarts", 0),
        startup_adjustments=list(data.get("startup_adjustments") or []),
        models=dict(data.get("models") or {}),
    )
