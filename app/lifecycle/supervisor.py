"""The container's main process: model preparation, engine and wrapper, supervised.

`scripts/start.sh` execs this module. It starts the wrapper first, so the
public port answers probes within about a second, then walks the lifecycle
(preflight: the engine's command line checked against the pinned vLLM,
then the Hub and the fit check; download; engine load with its compile cache
on the volume; warm-up) while publishing each phase in the status file the
wrapper serves. From then on it supervises:

- the wrapper exits → the engine is stopped and the container exits non-zero;
- the engine dies, or stops answering its health check for
  ENGINE_HEALTH_TIMEOUT_S, while serving → ON_ENGINE_FAILURE: exit non-zero,
  or relaunch it in place;
- the engine fails to start → the failure becomes one actionable sentence
  (`error`, public) and its last lines are kept apart (`engine_log_tail`,
  only for /info);
  a memory shortfall is retried with the setting it names changed, each at
  most once (memory_retry.py); then ON_STARTUP_FAILURE: keep serving the
  error, or exit non-zero;
- SIGTERM or SIGINT → the wrapper drains (DRAIN_TIMEOUT_S), the engine
  stops, and the process exits 0 with no child left behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from app.config import ConfigError, Settings, load_settings
from app.lifecycle.compile_cache import with_compile_cache
from app.lifecycle.engine_args import (
    ENGINE_IPC_DIR_ENV,
    build_engine_args,
    build_engine_launch,
    engine_env,
    resolve_device,
)
from app.lifecycle.flag_check import (
    EngineFacts,
    check_argv,
    check_engine_flags,
    check_environment,
    installed_vllm_version,
    spot_refusal,
)
from app.lifecycle.flag_verdicts import installed_plugins, kept_or_checked, verdict_key, verdict_path
from app.lifecycle.health_watch import wait_until_silent
from app.lifecycle.memory_retry import Retry, describe, plan_retry
from app.lifecycle.model_source import PreparedModel, prepare_model
from app.lifecycle.processes import ChildProcess, describe_exit
from app.lifecycle.startup_errors import StartupError, classify_engine_failure
from app.lifecycle.status import (
    CONTROL_SOCKET_ENV,
    STATUS_FILE_ENV,
    DownloadProgress,
    Phase,
    StartupStatus,
    write_status,
)
from app.lifecycle.warmup import warm_up
from app.media import detect_modalities
from app.observability.logging import configure_logging, install_secret_redaction
from app.observability.metrics import MULTIPROC_DIR_ENV, prepare_multiproc_dir

if TYPE_CHECKING:  # imported where used: only MODELS needs them, and they cost the engine's start time
    from app.catalog import ModelCatalog
    from app.lifecycle.model_engines import ModelEngines

log = logging.getLogger("app.lifecycle")
# How often the engine's /health is asked while it loads: the delay between its first 200 and `ready`.
ENGINE_POLL_S = 0.1
WRAPPER_STOP_MARGIN_S = 10.0
ENGINE_STOP_TIMEOUT_S = 15.0
# The engine's last lines repeated in the "engine died" log record.
DEATH_RECORD_LINES = 8


class StatusBoard:
    """The published startup status; written from the event loop and the download thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status = StartupStatus()
        self._lock = threading.Lock()
        self.publish()

    def publish(self) -> None:
        with self._lock:
            write_status(self.path, self.status)

    def enter(self, phase: Phase, error: str | None = None, log_tail: Sequence[str] = ()) -> None:
        with self._lock:
            if self.status.phase != phase or error:
                self.status.enter(phase, error, log_tail)
                log.info("phase", extra={"phase": phase.value, "error": error})
            write_status(self.path, self.status)

    def models(self, models: dict[str, dict[str, object]]) -> None:
        with self._lock:
            self.status.models = models
            write_status(self.path, self.status)

    def progress(self, progress: DownloadProgress) -> None:
        with self._lock:
            self.status.download = progress
            write_status(self.path, self.status)

    def adjusted(self, changes: Sequence[dict[str, object]]) -> None:
        with self._lock:
            self.status.startup_adjustments.extend(changes)
            write_status(self.path, self.status)


class Supervisor:
    def __init__(self, settings: Settings, runtime_dir: Path) -> None:
        self.settings = settings
        self.runtime_dir = runtime_dir
        self.board = StatusBoard(runtime_dir / "status.json")
        self.wrappers: list[ChildProcess] = []
        self.engine: ChildProcess | None = None
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.flag_check: asyncio.Future[str | None] | None = None
        self.model_engines: ModelEngines | None = None

    # --- main loop ----------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self.session = aiohttp.ClientSession()
        try:
            await self._start_wrappers()
            lifecycle = asyncio.ensure_future(self._lifecycle())
            stop = asyncio.ensure_future(self.stopping.wait())
            wrapper_exits = {asyncio.ensure_future(w.wait()): w for w in self.wrappers}
            done, _ = await asyncio.wait({lifecycle, stop, *wrapper_exits}, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                lifecycle.cancel()
                return await self._shutdown(0, drain=True)
            for task, wrapper in wrapper_exits.items():
                if task in done:
                    log.error("wrapper stopped; stopping the engine",
                              extra={"child": wrapper.name, "exit": describe_exit(task.result())})
                    lifecycle.cancel()
                    return await self._shutdown(1, drain=False)
            return await self._shutdown(lifecycle.result(), drain=False)
        finally:
            await self.session.close()

    def _on_signal(self, signum: int) -> None:
        if self.stopping.is_set():
            log.warning("second signal: stopping now", extra={"signal": signal.Signals(signum).name})
            for child in [*self.wrappers, self.engine]:
                if child is not None:
                    child.signal(signal.SIGKILL)
            return
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self.stopping.set()

    async def _shutdown(self, code: int, drain: bool) -> int:
        if self.flag_check is not None and not self.flag_check.done():
            self.flag_check.cancel()  # kills the check's child process, which must be reaped before the loop ends
            await asyncio.gather(self.flag_check, return_exceptions=True)
        # stop() sends one SIGTERM: the wrappers drain; a second signal would cut the drain short.
        wrapper_timeout = self.settings.DRAIN_TIMEOUT_S + WRAPPER_STOP_MARGIN_S
        stopping = [asyncio.ensure_future(w.stop(wrapper_timeout)) for w in self.wrappers]
        # Let every stop() send its SIGTERM first: once probes read "draining", the
        # wrappers already refuse new requests.
        await asyncio.sleep(0)
        if drain:
            self.board.enter(Phase.DRAINING)
        await asyncio.gather(*stopping)
        if self.model_engines is not None:
            await self.model_engines.close()
        if self.engine is not None:
            await self.engine.stop(ENGINE_STOP_TIMEOUT_S)
        log.info("stopped", extra={"exit_code": code})
        return code

    # --- wrapper ------------------------------------------------------------
    async def _start_wrappers(self) -> None:
        env = {**os.environ, STATUS_FILE_ENV: str(self.board.path)}
        if self.settings.catalog is not None:
            env[CONTROL_SOCKET_ENV] = str(self.control_socket)
        if self.settings.WORKERS > 1:
            metrics_dir = self.runtime_dir / "metrics"
            prepare_multiproc_dir(metrics_dir)
            env[MULTIPROC_DIR_ENV] = str(metrics_dir)
        for index in range(self.settings.WORKERS):
            wrapper = ChildProcess(f"wrapper-{index}", [sys.executable, "-m", "app.serve"], env, capture_output=False)
            await wrapper.start()
            self.wrappers.append(wrapper)

    # --- lifecycle ------------------------------------------------------------
    async def _lifecycle(self) -> int:
        """Returns an exit code when the container should stop; otherwise runs until cancelled."""
        if self.settings.ENGINE_URL:
            self.board.enter(Phase.LOADING)
            await self._wait_until_healthy(None, timeout_s=None)
            self.board.enter(Phase.READY)
            return await self._forever()
        if self.settings.catalog is not None:
            return await self._serve_models(self.settings.catalog)
        if (sentence := self._spot_check_engine_flags()) is not None:
            return await self._startup_failed(sentence)
        # The full check runs while the Hub is asked for the listing or a local model loads; the download
        # and the engine's readiness wait for its verdict.
        self.flag_check = asyncio.ensure_future(self._check_engine_flags())
        try:
            prepared = await self._prepare_model()
        except StartupError as error:
            return await self._startup_failed(str(error))
        self.board.status.resolved_revision = prepared.revision
        self.board.status.model_path = str(prepared.path)
        modalities = detect_modalities(prepared.path)
        settings = self.settings
        turned: set[str] = set()  # the memory retries' knobs, each turned at most once
        while True:
            self.board.enter(Phase.LOADING)
            launch = build_engine_launch(settings, prepared.path, modalities, prepared.lora_paths)
            launch = with_compile_cache(launch, settings, prepared.path, prepared.revision)
            log.info("starting engine", extra={"device": launch.device, "argv": launch.argv[1:]})
            self.engine = ChildProcess(
                "engine", launch.argv, launch.env, capture_output=True, private_dir_env=ENGINE_IPC_DIR_ENV
            )
            await self.engine.start()
            outcome = await self._wait_until_healthy(self.engine, settings.ENGINE_STARTUP_TIMEOUT_S)
            if (refusal := await self._flag_verdict()) is not None:
                await self.engine.stop(ENGINE_STOP_TIMEOUT_S)
                return await self._startup_failed(refusal)
            if outcome == "ready" and settings.WARMUP:
                outcome = await self._warm_up(self.engine, settings, "image" in modalities)
            if outcome == "ready":
                self.board.enter(Phase.READY)
                log.info("ready", extra={"phase_seconds": self.board.status.to_json()["phase_seconds"]})
                message = await self._serve(self.engine)
                tail = list(self.engine.tail)
                if self.settings.ON_ENGINE_FAILURE == "restart":
                    self.board.status.engine_restarts += 1
                    log.warning("restarting engine (ON_ENGINE_FAILURE=restart)")
                    self.board.enter(Phase.LOADING, message + " Restarting it (ON_ENGINE_FAILURE=restart).", tail)
                    continue
                self.board.enter(Phase.FAILED, message + " Exiting (ON_ENGINE_FAILURE=exit).", tail)
                return 1
            await self.engine.stop(ENGINE_STOP_TIMEOUT_S)  # after an exit: what it left behind
            if outcome == "timeout":
                return await self._startup_failed(
                    f"The engine did not become healthy within ENGINE_STARTUP_TIMEOUT_S={settings.ENGINE_STARTUP_TIMEOUT_S:g}s; "
                    "raise it for large models or slow disks.",
                    list(self.engine.tail),
                )
            lines = list(self.engine.tail)
            retry = plan_retry(lines, settings, launch.device, frozenset(turned))
            if retry is not None:
                turned.add(retry.knob)
                self._record_retry(retry)
                settings = retry.settings
                continue
            sentence = classify_engine_failure(lines, settings) or (
                f"The engine {outcome} during startup for a reason this image does not recognise: "
                "its last lines are in the container log and in /info (engine_log_tail)."
            )
            return await self._startup_failed(sentence, lines)

    async def _warm_up(self, engine: ChildProcess, settings: Settings, images: bool) -> str:
        """'ready' after the warm-up requests, or how the engine exited during them."""
        assert self.session is not None
        self.board.enter(Phase.WARMUP)
        images = images and settings.IMAGE_LIMIT > 0
        warming = asyncio.ensure_future(warm_up(self.session, settings.engine_url, settings.served_model_name, images))
        exited = asyncio.ensure_future(engine.wait())
        try:
            await asyncio.wait((warming, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            warming.cancel()
            exited.cancel()
        if exited.done() and not exited.cancelled():
            return describe_exit(exited.result())
        return "ready"

    def _record_retry(self, retry: Retry) -> None:
        changed = [change.to_json() for change in retry.changes]
        log.warning(
            f"engine ran out of memory while starting; retrying with {describe(retry)}",
            extra={"reason": retry.reason, "changed": changed},
        )
        self.board.adjusted([{**change, "reason": retry.reason} for change in changed])

    async def _serve_models(self, catalog: ModelCatalog) -> int:
        """MODELS: no engine yet; each starts when a request names its model (`ModelEngines`)."""
        from app.lifecycle.model_engines import ModelEngines

        facts = EngineFacts.load()
        refusals = [
            f"Model '{model.name}': {sentence}" for model in catalog
            if facts is not None and (sentence := spot_refusal(check_argv(model.settings), model.settings, facts))
        ]
        if refusals:
            return await self._startup_failed(" ".join(refusals))
        # The full check, model by model, before any download (its verdicts are kept on the volume).
        for model in catalog:
            if (sentence := await self._check_engine_flags(model.settings, model.name)) is not None:
                refusals.append(f"Model '{model.name}': {sentence}")
        if refusals:
            return await self._startup_failed(" ".join(refusals))
        assert self.session is not None
        self.model_engines = ModelEngines(
            catalog, self.session, max_loaded=self.settings.MAX_LOADED_MODELS,
            idle_ttl_s=self.settings.MODEL_IDLE_TTL_S, publish=self.board.models,
            host_budget_bytes=self.settings.SLEEP_HOST_MEMORY_GB * 2**30,
        )
        if self.settings.MODELS_DOWNLOAD == "eager":
            self.board.enter(Phase.PREFLIGHT)
            if failures := await self.model_engines.prepare_all(self.board.enter):
                return await self._startup_failed(" ".join(failures))
        serving = asyncio.ensure_future(self.model_engines.serve(self.control_socket))
        await asyncio.sleep(0)
        self.board.enter(Phase.READY)
        log.info("ready", extra={"models": list(catalog.names), "max_loaded_models": self.settings.MAX_LOADED_MODELS})
        await serving
        return 0

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    async def _serve(self, engine: ChildProcess) -> str:
        """Wait while the engine serves; the sentence that says why it stopped (it is gone by then)."""
        assert self.session is not None
        limit_s = self.settings.ENGINE_HEALTH_TIMEOUT_S
        exited = asyncio.ensure_future(engine.wait())
        silent = asyncio.ensure_future(wait_until_silent(self.session, f"{self.settings.engine_url}/health", limit_s))
        try:
            await asyncio.wait((exited, silent), return_when=asyncio.FIRST_COMPLETED)
        finally:
            silent.cancel()
            exited.cancel()
        if exited.done() and not exited.cancelled():
            code = exited.result()
            log.error("engine died", extra={"exit": describe_exit(code), "last_lines": list(engine.tail)[-DEATH_RECORD_LINES:]})
            await engine.kill()  # what it left behind, such as its engine-core process
            return f"Engine {describe_exit(code)} while serving."
        seconds = silent.result()
        log.error(
            "engine stopped answering its health check; killing it",
            extra={"silent_s": round(seconds, 1), "engine_health_timeout_s": limit_s, "pid": engine.pid},
        )
        await engine.kill()
        return (
            f"The engine stopped answering its health check for {seconds:.0f} s "
            f"(ENGINE_HEALTH_TIMEOUT_S={limit_s:g}) and was killed."
        )

    def _spot_check_engine_flags(self) -> str | None:
        """Milliseconds, before any Hub request: the flags against the recorded facts of the pinned vLLM."""
        facts = EngineFacts.load()
        if facts is None:
            log.warning("no recorded engine flags for the installed vLLM; only the full check judges the flags")
            return None
        return spot_refusal(check_argv(self.settings), self.settings, facts)

    async def _check_engine_flags(self, settings: Settings | None = None, model: str | None = None) -> str | None:
        """vLLM's own parser judges the engine's command line (in a child process, for seconds), unless a
        start with the same configuration already did (its verdict is kept on the volume).

        With MODELS, `settings` and `model` are one model's (`CatalogModel.settings`, its served name).
        """
        settings = settings or self.settings
        self.board.enter(Phase.PREFLIGHT)
        started = time.monotonic()
        device = resolve_device(settings.DEVICE)
        env = check_environment(engine_env(settings, device), os.environ)
        version = installed_vllm_version() or "unknown"
        key = await asyncio.to_thread(
            lambda: verdict_key(version=version, plugins=installed_plugins(), device=device,
                                argv=check_argv(settings), env=env)
        )
        try:
            verdict = await kept_or_checked(verdict_path(settings.cache_dir, key), version,
                                            lambda: check_engine_flags(env, model=model))
        except OSError as error:  # the child could not be started: the engine judges its flags itself
            log.warning("engine flag check could not start", extra={"error": str(error)})
            return None
        sentence = verdict.refusal if verdict is not None else None
        log.info("engine flags checked", extra={"seconds": round(time.monotonic() - started, 2),
                                                "refused": sentence is not None, **({"model": model} if model else {})})
        return sentence

    async def _flag_verdict(self) -> str | None:
        """The flag check's refusal, once it has finished; None when it accepted the command line."""
        assert self.flag_check is not None
        return await asyncio.shield(self.flag_check)

    async def _prepare_model(self) -> PreparedModel:
        """Runs the blocking download in a daemon thread, so a stop never waits for it."""
        future: Future[PreparedModel] = Future()
        loop = asyncio.get_running_loop()

        def before_download() -> None:
            """A wrong engine setting must cost no download."""
            if (refusal := asyncio.run_coroutine_threadsafe(self._flag_verdict(), loop).result()) is not None:
                raise StartupError(refusal)

        def work() -> None:
            try:
                future.set_result(prepare_model(self.settings, self.board.enter, self.board.progress, before_download))
            except BaseException as error:  # noqa: BLE001 - handed to the event loop below
                future.set_exception(error)

        threading.Thread(target=work, name="model-download", daemon=True).start()
        return await asyncio.wrap_future(future)

    async def _wait_until_healthy(self, engine: ChildProcess | None, timeout_s: float | None) -> str:
        """'ready', 'timeout', or how the engine exited."""
        assert self.session is not None
        url = f"{self.settings.engine_url}/health"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if engine is not None and engine.process is not None and engine.process.returncode is not None:
                await engine.wait()
                return describe_exit(engine.process.returncode)
            if self.flag_check is not None and self.flag_check.done() and self.flag_check.result() is not None:
                return "refused by the flag check"
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return "ready"
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if deadline is not None and time.monotonic() > deadline:
                return "timeout"
            await asyncio.sleep(ENGINE_POLL_S)

    async def _startup_failed(self, sentence: str, log_tail: Sequence[str] = ()) -> int:
        self.board.enter(Phase.FAILED, sentence, log_tail)
        log.error("startup failed", extra={"error": sentence, "on_startup_failure": self.settings.ON_STARTUP_FAILURE})
        if self.settings.ON_STARTUP_FAILURE == "exit":
            return 1
        return await self._forever()

    async def _forever(self) -> int:
        await asyncio.Event().wait()
        return 0


def warn_if_open(settings: Settings) -> None:
    """One warning when the wrapper listens beyond this machine with no API_KEY."""
    if settings.api_keys or _is_loopback(settings.HOST):
        return
    exposed = "use the model and read stored conversations" if settings.CONVERSATIONS_ENABLED else "use the model"
    log.warning(
        f"HOST={settings.HOST} with no API_KEY: anyone who can reach port {settings.PORT} can {exposed}; "
        "set API_KEY, or HOST=127.0.0.1 behind a proxy that authenticates.",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> int:
    try:
        settings = load_settings()
        build_engine_args(settings, settings.MODEL_NAME, frozenset())
        for model in settings.catalog or ():
            build_engine_args(model.settings, model.source, frozenset())
    except ConfigError as error:
        print(f"vllm-inference-api: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL)
    install_secret_redaction(settings.secret_values)
    warn_if_open(settings)
    runtime_dir = Path(tempfile.mkdtemp(prefix="vllm-inference-api-"))
    try:
        return asyncio.run(Supervisor(settings, runtime_dir).run())
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
