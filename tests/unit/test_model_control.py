"""The control channel between the wrappers and the supervisor's model engines (MODELS).

The supervisor side (`ModelEngines`: its unix-socket API, its pool, what it publishes) runs for real
and the wrapper side is the real `ModelRouter`; only starting an engine is replaced (`StandInEngines`
returns a handle with a URL, `SilentEngines` a child process that is no engine, instead of launching vLLM,
which tests/e2e/test_multi_model*.py do).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from app.catalog import ModelCatalog
from app.config import load_settings
from app.errors import APIError
from app.lifecycle.engine_pool import LoadFailed
from app.lifecycle.model_engines import ModelEngine, ModelEngines
from app.lifecycle.processes import ChildProcess
from app.proxy.models import ModelRouter
from tests.fakehub import FakeHub, use_in_process


class StandInHandle:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


class StandInEngines(ModelEngines):
    """ModelEngines whose engines are stand-ins: a model named in `failing` fails with that sentence."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failing: dict[str, str] = {}
        self.handles: list[StandInHandle] = []

    async def _launch(self, name: str) -> StandInHandle:  # type: ignore[override]
        if name in self.failing:
            raise LoadFailed(self.failing[name])
        model = self.catalog.get(name)
        assert model is not None
        handle = StandInHandle(model.settings.engine_url)
        self.handles.append(handle)
        return handle


@pytest_asyncio.fixture
async def channel(tmp_path: Path) -> AsyncIterator[tuple[StandInEngines, ModelRouter, list[dict[str, object]]]]:
    catalog = ModelCatalog.build(load_settings({"VLLM_PORT": "9300"}), "a=org/a,b=org/b")
    published: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as session:
        engines = StandInEngines(catalog, session, max_loaded=1, idle_ttl_s=0, publish=published.append)
        socket = tmp_path / "control.sock"
        serving = asyncio.create_task(engines.serve(socket))
        while not socket.exists():
            await asyncio.sleep(0.01)
        router = ModelRouter(catalog.names, str(socket), wait_timeout_s=30)
        await router.start()
        yield engines, router, published
        await router.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await engines.close()


async def test_a_lease_returns_the_models_engine_url_and_its_state_is_published(channel) -> None:  # type: ignore[no-untyped-def]
    engines, router, published = channel

    async with router.lease("b") as url:
        assert url == "http://127.0.0.1:9301"
        # A loaded model's engine URL is published too: the wrappers scrape its /metrics there.
        assert published[-1] == {
            "a": {"state": "unloaded", "error": None},
            "b": {"state": "loaded", "error": None, "url": "http://127.0.0.1:9301"},
        }
        assert engines.pool.views()["b"].leases == 1
    for _ in range(100):
        if engines.pool.views()["b"].leases == 0:
            break
        await asyncio.sleep(0.01)
    assert engines.pool.views()["b"].leases == 0

    async with router.lease("a") as url:  # MAX_LOADED_MODELS=1: b is stopped for a
        assert url == "http://127.0.0.1:9300"
    assert [handle.stopped for handle in engines.handles] == [True, False]


async def test_a_failed_load_reaches_the_wrapper_as_its_sentence(channel) -> None:  # type: ignore[no-untyped-def]
    engines, router, published = channel
    engines.failing["a"] = "Model 'a' failed to load: its engine was killed by SIGKILL."

    with pytest.raises(APIError) as caught:
        async with router.lease("a"):
            pass

    assert (caught.value.status, caught.value.code) == (503, "model_load_failed")
    assert caught.value.message == "Model 'a' failed to load: its engine was killed by SIGKILL."
    assert published[-1]["a"] == {"state": "failed", "error": "Model 'a' failed to load: its engine was killed by SIGKILL."}


async def test_the_supervisor_refuses_a_name_it_does_not_serve(channel) -> None:  # type: ignore[no-untyped-def]
    _, router, _ = channel
    with pytest.raises(APIError) as caught:
        await router._call("acquire", "z")
    assert caught.value.status == 404
    assert caught.value.message == "The model 'z' does not exist; this server serves: a, b."


class SilentEngines(ModelEngines):
    """ModelEngines whose 'engine' is a real child process that never answers /health (or exits at once)."""

    def __init__(self, *args: object, code: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.code = code
        self.engines: list[ModelEngine] = []

    async def _launch(self, name: str) -> ModelEngine:
        model = self.catalog.get(name)
        assert model is not None
        process = ChildProcess(f"engine {name}", [sys.executable, "-c", self.code], dict(os.environ), capture_output=True)
        await process.start()
        engine = ModelEngine(model, process)
        engine.watch = asyncio.create_task(self._watch(engine))
        self.engines.append(engine)
        return engine


@pytest.mark.parametrize(
    ("code", "sentence"),
    [
        ("import time; time.sleep(600)",
         r"The engine of model 'a' stopped answering its health check for \d+ s \(ENGINE_HEALTH_TIMEOUT_S=1\) and was killed\."),
        ("import sys; sys.exit(3)", r"The engine of model 'a' exited with code 3 while serving\."),
    ],
)
async def test_an_engine_that_dies_or_falls_silent_while_serving_fails_its_model(code: str, sentence: str) -> None:
    catalog = ModelCatalog.build(load_settings({"VLLM_PORT": "9310", "ENGINE_HEALTH_TIMEOUT_S": "1"}), "a=org/a")
    async with aiohttp.ClientSession() as session:
        engines = SilentEngines(catalog, session, max_loaded=1, idle_ttl_s=0, publish=lambda _models: None, code=code)
        await engines.pool.acquire("a")
        engines.pool.release("a")

        deadline = time.monotonic() + 60
        while engines.pool.views()["a"].state.value != "failed":
            assert time.monotonic() < deadline, "the model was not marked failed"
            await asyncio.sleep(0.1)

        assert re.fullmatch(sentence, engines.pool.views()["a"].error or "")
        process = engines.engines[0].process.process
        assert process is not None and process.returncode is not None  # gone, and reaped
        await engines.close()


async def test_eager_preparation_downloads_every_model_and_names_the_ones_that_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub is the local double (tests/fakehub.py): org/model exists, org/missing does not."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (source / "model.safetensors").write_bytes(b"\x01" * 4096)
    with FakeHub({"org/model": source}) as hub:
        use_in_process(hub, monkeypatch)
        settings = load_settings({"HF_HOME": str(tmp_path / "cache"), "MODELS": "good=org/model,gone=org/missing"})
        assert settings.catalog is not None
        published: list[dict[str, dict[str, object]]] = []
        phases: list[str] = []
        async with aiohttp.ClientSession() as session:
            engines = ModelEngines(settings.catalog, session, max_loaded=1, idle_ttl_s=0, publish=published.append)
            failures = await engines.prepare_all(lambda phase: phases.append(phase.value))

    assert len(failures) == 1 and failures[0].startswith("Model 'gone': ")
    assert "MODELS 'org/missing' does not exist on the Hub" in failures[0] and "MODEL_NAME" not in failures[0]
    download = published[-1]["good"]["download"]
    assert isinstance(download, dict) and download["percent"] == 100.0
    assert "download" not in published[-1]["gone"]
    assert "downloading" in phases
    assert (tmp_path / "cache").exists()
