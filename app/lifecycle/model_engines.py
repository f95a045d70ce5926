"""The supervisor's side of a multi-model deployment: engines per model, and the control channel.

With MODELS set, no engine starts with the container. The wrapper processes
ask for a model over a small HTTP API on a unix socket in the supervisor's
runtime directory (its path reaches them in CONTROL_SOCKET_ENV, like the
status file's):

- `POST /acquire {"model": name}` waits until the model's engine answers and
  returns its URL (200), or the load's failure sentence (503), or the names
  served (404); the wrapper then holds a lease on the model;
- `POST /release {"model": name}` gives the lease back;
- `POST /unload {"model": name}` stops the model's engine (409 while it has
  requests in flight or is loading); loading on request is an acquire and a release.

A wrapper holds one lease per model while it has requests in flight for it,
so steady traffic costs no call here. The `EnginePool` decides which engines
run; this module starts them with the single-model code (download, command
line, health wait, failure sentences) from each model's own `Settings`, and
publishes every model's state (and a loaded one's engine URL) in the status file (`models`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from app.catalog import CatalogModel, ModelCatalog
from app.config import Settings
from app.lifecycle.compile_cache import with_compile_cache
from app.lifecycle.engine_args import ENGINE_IPC_DIR_ENV, build_engine_launch
from app.lifecycle.engine_pool import EnginePool, LoadFailed, UnknownModel
from app.lifecycle.health_watch import wait_until_silent
from app.lifecycle.model_source import PreparedModel, prepare_model
from app.lifecycle.processes import ChildProcess, describe_exit
from app.lifecycle.startup_errors import StartupError, classify_engine_failure
from app.lifecycle.status import (
    CONTROL_SOCKET_ENV,  # noqa: F401 (where the wrappers find the socket)
    DownloadProgress,
    Phase,
)
from app.media import detect_modalities

log = logging.getLogger("app.lifecycle")
ENGINE_POLL_S = 0.5
ENGINE_STOP_TIMEOUT_S = 15.0
SLEEP_CALL_TIMEOUT_S = 300.0  # moving a large model's weights between GPU and host memory
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


class ModelEngine:
    """One model's running engine process; the pool's handle (a `Sleeper` when launched with sleep mode)."""

    def __init__(
        self, model: CatalogModel, process: ChildProcess, session: aiohttp.ClientSession | None = None,
        sleep_bytes: int = 0,
    ) -> None:
        self.model = model
        self.process = process
        self.watch: asyncio.Task[None] | None = None
        self._session = session
        self.can_sleep = session is not None  # launched with --enable-sleep-mode
        self.sleep_bytes = sleep_bytes

    @property
    def url(self) -> str:
        return self.model.settings.engine_url

    async def stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        await self.process.stop(ENGINE_STOP_TIMEOUT_S)

    async def sleep(self) -> None:
        """vLLM's sleep level 1: weights to host memory, KV cache dropped; the process stays."""
        await self._call("/sleep?level=1")

    async def wake_up(self) -> None:
        await self._call("/wake_up")

    async def _call(self, path: str) -> None:
        assert self._session is not None, "this engine was not launched with sleep mode"
        timeout = aiohttp.ClientTimeout(total=SLEEP_CALL_TIMEOUT_S)
        async with self._session.post(f"{self.url}{path}", timeout=timeout) as response:
            if response.status != 200:
                raise RuntimeError(f"POST {path} answered {response.status}: {(await response.text())[:200]}")


def sleep_mode(settings: Settings, device: str) -> bool:
    """MODEL_SLEEP=auto: vLLM's sleep mode where it exists, on a CUDA GPU; the CPU engine has none."""
    return settings.MODEL_SLEEP == "auto" and device == "cuda"


def weights_bytes(model_path: Path) -> int:
    """What the model's weights take on disk, as much as they take in host memory when its engine sleeps."""
    return sum(path.stat().st_size for pattern in WEIGHT_PATTERNS for path in model_path.rglob(pattern))


class ModelEngines:
    def __init__(
        self,
        catalog: ModelCatalog,
        session: aiohttp.ClientSession,
        *,
        max_loaded: int,
        idle_ttl_s: float,
        publish: Callable[[dict[str, dict[str, object]]], None],
        host_budget_bytes: float = 0.0,
    ) -> None:
        self.catalog = catalog
        self._session = session
        self._publish = publish
        self.pool: EnginePool[ModelEngine] = EnginePool(
            catalog.names, self._launch, max_loaded=max_loaded, idle_ttl_s=idle_ttl_s,
            host_budget_bytes=host_budget_bytes, on_change=self._changed,
        )
        self._runner: web.AppRunner | None = None
        self._downloads: dict[str, DownloadProgress] = {}

    # --- control channel --------------------------------------------------------
    async def serve(self, socket_path: Path) -> None:
        """Answer the wrappers on `socket_path` and unload idle models, until cancelled."""
        app = web.Application()
        app.router.add_post("/acquire", self._acquire)
        app.router.add_post("/release", self._release)
        app.router.add_post("/unload", self._unload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(socket_path)).start()
        self._changed()
        await self.pool.run_idle_eviction()
        await asyncio.Event().wait()

    async def close(self) -> None:
        """Stop answering and stop every engine: at shutdown, once the wrappers have drained.

        The socket stays open until then, so the requests that drain can still give their leases back.
        """
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pool.close()

    async def _acquire(self, request: web.Request) -> web.Response:
        name = await _model_of(request)
        try:
            engine = await self.pool.acquire(name)
        except UnknownModel as error:
            return web.json_response({"error": str(error), "models": list(error.names)}, status=404)
        except LoadFailed as error:
            return web.json_response({"error": str(error)}, status=503)
        return web.json_response({"url": engine.url})

    async def _release(self, request: web.Request) -> web.Response:
        name = await _model_of(request)
        try:
            self.pool.release(name)
        except (UnknownModel, RuntimeError) as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response({})

    async def _unload(self, request: web.Request) -> web.Response:
        name = await _model_of(request)
        try:
            await self.pool.unload(name)
        except UnknownModel as error:
            return web.json_response({"error": str(error), "models": list(error.names)}, status=404)
        except RuntimeError as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response({})

    def _changed(self) -> None:
        models: dict[str, dict[str, object]] = {}
        loaded = self.pool.loaded()
        for name, view in self.pool.views().items():
            models[name] = {"state": view.state.value, "error": view.error}
            if name in loaded:  # where the wrappers scrape its /metrics
                models[name]["url"] = loaded[name].url
            if name in self._downloads:
                models[name]["download"] = self._downloads[name].to_json()
        self._publish(models)

    async def prepare_all(self, on_phase: Callable[[Phase], None]) -> list[str]:
        """MODELS_DOWNLOAD=eager: every model checked and downloaded at start, in MODELS order.

        Returns one sentence per model that cannot be served (a missing or gated repository, a bad
        revision, a full disk), naming it; each model's download progress is published meanwhile.
        """
        failures: list[str] = []
        for model in self.catalog:
            log.info("preparing model", extra={"model": model.name})
            try:
                await _prepare_in_thread(model, on_phase, self._progress_of(model.name))
            except StartupError as error:
                failures.append(f"Model '{model.name}': {error}")
        return failures

    def _progress_of(self, name: str) -> Callable[[DownloadProgress], None]:
        def progress(done: DownloadProgress) -> None:  # called from the download thread
            self._downloads[name] = done
            self._changed()

        return progress

    # --- engines ----------------------------------------------------------------
    async def _launch(self, name: str) -> ModelEngine:
        model = self.catalog.get(name)
        assert model is not None
        started = time.monotonic()
        try:
            prepared = await _prepare_in_thread(model, on_progress=self._progress_of(name))
        except StartupError as error:
            raise LoadFailed(f"Model '{name}' could not be prepared: {error}") from None
        settings = model.settings
        launch = build_engine_launch(settings, prepared.path, detect_modalities(prepared.path), prepared.lora_paths)
        launch = with_compile_cache(launch, settings, prepared.path, prepared.revision)
        sleeps = sleep_mode(settings, launch.device)
        if sleeps:  # the /sleep and /wake_up routes are vLLM's dev routes, on the internal port only
            launch = replace(launch, argv=[*launch.argv, "--enable-sleep-mode"],
                             env={**launch.env, "VLLM_SERVER_DEV_MODE": "1"})
        log.info("starting engine", extra={"model": name, "device": launch.device, "argv": launch.argv[1:]})
        process = ChildProcess(
            f"engine {name}", launch.argv, launch.env, capture_output=True, private_dir_env=ENGINE_IPC_DIR_ENV
        )
        await process.start()
        try:
            outcome = await self._wait_until_healthy(process, settings.engine_url, settings.ENGINE_STARTUP_TIMEOUT_S)
        except asyncio.CancelledError:  # shutdown during the load: no engine left behind
            await process.stop(ENGINE_STOP_TIMEOUT_S)
            raise
        if outcome != "ready":
            await process.stop(ENGINE_STOP_TIMEOUT_S)
            lines = list(process.tail)
            if outcome == "timeout":
                reason = (f"its engine did not become healthy within ENGINE_STARTUP_TIMEOUT_S="
                          f"{settings.ENGINE_STARTUP_TIMEOUT_S:g}s")
            else:
                reason = classify_engine_failure(lines, settings) or (
                    f"its engine {outcome} for a reason this image does not recognise (see the container log)"
                )
            raise LoadFailed(f"Model '{name}' failed to load: {reason}")
        engine = ModelEngine(
            model, process, self._session if sleeps else None,
            weights_bytes(Path(prepared.path)) if sleeps else 0,
        )
        engine.watch = asyncio.create_task(self._watch(engine), name=f"watch {name}")
        log.info("model engine ready", extra={"model": name, "load_s": round(time.monotonic() - started, 2)})
        return engine

    async def _watch(self, engine: ModelEngine) -> None:
        """While it serves: an engine that exits, or stops answering /health for ENGINE_HEALTH_TIMEOUT_S, is lost."""
        name, limit_s = engine.model.name, engine.model.settings.ENGINE_HEALTH_TIMEOUT_S
        exited = asyncio.ensure_future(engine.process.wait())
        silent = asyncio.ensure_future(wait_until_silent(self._session, f"{engine.url}/health", limit_s))
        try:
            await asyncio.wait((exited, silent), return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            silent.cancel()
        if exited.done() and not exited.cancelled():
            sentence = f"The engine of model '{name}' {describe_exit(exited.result())} while serving."
        else:
            sentence = (
                f"The engine of model '{name}' stopped answering its health check for {silent.result():.0f} s "
                f"(ENGINE_HEALTH_TIMEOUT_S={limit_s:g}) and was killed."
            )
        await engine.process.kill()  # with what it left behind, such as its engine-core process
        self.pool.lost(name, engine, sentence)

    async def _wait_until_healthy(self, process: ChildProcess, url: str, timeout_s: float) -> str:
        """'ready', 'timeout', or how the engine exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            if process.process is not None and process.process.returncode is not None:
                await process.wait()
                return describe_exit(process.process.returncode)
            try:
                async with self._session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return "ready"
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                return "timeout"
            await asyncio.sleep(ENGINE_POLL_S)


async def _model_of(request: web.Request) -> str:
    payload = await request.json()
    return str(payload.get("model"))


async def _prepare_in_thread(
    model: CatalogModel,
    on_phase: Callable[[Phase], None] = lambda _phase: None,
    on_progress: Callable[[DownloadProgress], None] = lambda _progress: None,
) -> PreparedModel:
    """The blocking download runs in a daemon thread, so a stop never waits for it."""
    future: Future[PreparedModel] = Future()

    def work() -> None:
        try:
            future.set_result(prepare_model(model.settings, on_phase, on_progress, model_setting="MODELS"))
        except BaseException as error:  # noqa: BLE001 - handed to the event loop below
            future.set_exception(error)

    threading.Thread(target=work, name=f"model-download {model.name}", daemon=True).start()
    return await asyncio.wrap_future(future)
