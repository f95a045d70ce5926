"""The wrapper of a multi-model deployment (MODELS), in-process: requests go to the engine of the model they name.

The supervisor's side runs for real (`ModelEngines`, its control socket and the status file it writes),
but its engines are `tests.fake_engine` stand-ins, one per model, so what reached which engine can be
counted; tests/e2e/test_multi_model*.py run the same paths on the real CPU engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest_asyncio
from PIL import Image
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.catalog import CatalogModel, ModelCatalog
from app.config import load_settings
from app.lifecycle.engine_pool import LoadFailed
from app.lifecycle.model_engines import ModelEngine, ModelEngines
from app.lifecycle.status import Phase, StartupStatus, write_status
from app.routes import build_route_table
from tests.fake_engine import FakeEngine
from tests.inprocess import Wrapper, running_models_wrapper, running_wrapper

MODELS = "a=org/a,b=org/b"


class StandInHandle:
    def __init__(self, url: str) -> None:
        self.url = url

    async def stop(self) -> None:
        pass


class FakeEngines(ModelEngines):
    """ModelEngines whose 'engines' are the running fake engines, one per model."""

    def __init__(self, *args: object, fakes: dict[str, FakeEngine], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fakes = fakes

    async def _launch(self, name: str) -> StandInHandle:  # type: ignore[override]
        return StandInHandle(self.fakes[name].url)


@dataclass
class Deployment:
    wrapper: Wrapper
    fakes: dict[str, FakeEngine]


@asynccontextmanager
async def serving(tmp_path: Path, max_loaded: int = 1, **env: str) -> AsyncIterator[Deployment]:
    """Both sides of a deployment of MODELS with `env` (MODELS_CONFIG, ...), one fake engine per model."""
    fakes = {"a": FakeEngine(), "b": FakeEngine()}
    fakes["b"].max_model_len = 2048  # what tells the models' facts apart
    for fake in fakes.values():
        await fake.start()
    status_file = tmp_path / "status.json"
    status = StartupStatus(phase=Phase.READY)

    def publish(models: dict[str, dict[str, object]]) -> None:
        status.models = models
        write_status(status_file, status)

    publish({})
    catalog = ModelCatalog.build(load_settings(env), MODELS, env.get("MODELS_CONFIG"))
    socket = tmp_path / "control.sock"
    async with aiohttp.ClientSession() as session:
        engines = FakeEngines(catalog, session, max_loaded=max_loaded, idle_ttl_s=0, publish=publish, fakes=fakes)
        serving = asyncio.create_task(engines.serve(socket))
        while not socket.exists():
            await asyncio.sleep(0.01)
        async with running_models_wrapper(str(socket), status_file, MODELS=MODELS, **env) as wrapper:
            yield Deployment(wrapper, fakes)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await engines.close()
    for fake in fakes.values():
        await fake.stop()


@pytest_asyncio.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    async with serving(tmp_path) as deployment:
        yield deployment


def chat_body(model: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


async def test_each_request_reaches_the_engine_of_the_model_it_names(deployment: Deployment) -> None:
    async with deployment.wrapper.client() as client:
        for model in ("a", "b", "a"):
            response = await client.post("/v1/chat/completions", json=chat_body(model))
            assert response.status_code == 200, response.text
        listing = (await client.get("/v1/models")).json()

    assert len(deployment.fakes["a"].chat_requests) == 2
    assert len(deployment.fakes["b"].chat_requests) == 1
    assert [(entry["id"], entry["state"]) for entry in listing["data"]] == [("a", "loaded"), ("b", "unloaded")]
    lines = [line for line in await deployment.wrapper.wait_for_lines(4) if line["path"] == "/v1/chat/completions"]
    assert [line["model"] for line in lines] == ["a", "b", "a"]
    assert all(line["load_wait_ms"] >= 0 for line in lines)


async def test_unknown_or_missing_models_are_refused_before_any_engine(deployment: Deployment) -> None:
    async with deployment.wrapper.client() as client:
        unknown = await client.post("/v1/chat/completions", json=chat_body("gpt-4"))
        missing = await client.post("/v1/chat/completions", json=chat_body(None))

    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The model 'gpt-4' does not exist; this server serves: a, b.",
        "type": "not_found_error", "param": "model", "code": "model_not_found",
    }
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_required"
    assert all(not fake.received for fake in deployment.fakes.values())


async def test_generate_goes_to_the_engine_of_the_model_it_names(deployment: Deployment) -> None:
    async with deployment.wrapper.client() as client:
        answer = await client.post("/generate", json={"model": "b", "prompt": "hello there", "max_tokens": 8})
        async with client.stream("POST", "/generate", json={"model": "a", "prompt": "stream it", "stream": True}) as streamed:
            events = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
        unknown = await client.post("/generate", json={"model": "gpt-4", "prompt": "hello"})
        missing = await client.post("/generate", json={"prompt": "hello"})

    assert answer.status_code == 200, answer.text
    assert answer.json()["response"].startswith("Echo: hello there")
    # The facts and the token count come from the model's own engine: b's context is 2048, a's 4096.
    assert answer.json()["model_info"] == {"name": "b", "max_model_len": 2048}
    assert [request["model"] for request in deployment.fakes["b"].chat_requests] == ["b"]
    assert [request["model"] for request in deployment.fakes["a"].chat_requests] == ["a"]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["model_info"] == {"name": "a", "max_model_len": 4096}
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "The model 'gpt-4' does not exist; this server serves: a, b."
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_required"
    lines = [line for line in await deployment.wrapper.wait_for_lines(4) if line["path"] == "/generate"]
    assert [line["model"] for line in lines[:2]] == ["b", "a"]


async def test_audio_uploads_go_to_the_model_their_form_names(deployment: Deployment) -> None:
    audio = {"file": ("clip.wav", b"RIFF" + bytes(2000), "audio/wav")}
    async with deployment.wrapper.client() as client:
        to_b = await client.post("/v1/audio/transcriptions", files=audio, data={"model": "b", "language": "en"})
        unknown = await client.post("/v1/audio/transcriptions", files=audio, data={"model": "whisper"})
        missing = await client.post("/v1/audio/translations", files=audio, data={"language": "en"})
        malformed = await client.post(
            "/v1/audio/transcriptions", content=b"not a form",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )

    assert to_b.status_code == 200, to_b.text
    [received] = deployment.fakes["b"].requests_to("/v1/audio/transcriptions")
    assert b'name="model"\r\n\r\nb\r\n' in received.body and b"RIFF" in received.body  # relayed as sent
    assert not deployment.fakes["a"].received
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "this server serves: a, b" in unknown.json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_required"
    assert malformed.status_code == 400, malformed.text


async def test_routes_that_do_not_name_a_model_say_so(deployment: Deployment) -> None:
    async with deployment.wrapper.client() as client:
        stored = await client.get("/v1/responses/resp_1")

    assert stored.status_code == 400, stored.text
    error = stored.json()["error"]
    assert error["code"] == "unsupported_route" and "names no model" in error["message"]
    assert all(not fake.received for fake in deployment.fakes.values())


def image_body(model: str) -> dict[str, object]:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5}


async def test_each_model_gets_its_own_media_limits(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("b:\n  IMAGE_LIMIT: 0\n")
    async with serving(tmp_path, MODELS_CONFIG=str(config), IMAGE_LIMIT="1") as deployment:
        async with deployment.wrapper.client() as client:
            to_a = await client.post("/v1/chat/completions", json=image_body("a"))
            to_b = await client.post("/v1/chat/completions", json=image_body("b"))

    assert to_a.status_code == 200, to_a.text
    assert to_b.status_code == 400
    assert "IMAGE_LIMIT" in to_b.json()["error"]["message"]
    assert not deployment.fakes["b"].received


class StandInModelEngine(ModelEngine):
    """The supervisor's real engine handle (its /sleep and /wake_up calls), its process a fake engine's server."""

    def __init__(self, model: CatalogModel, fake: FakeEngine, session: aiohttp.ClientSession) -> None:
        super().__init__(model, process=None, session=session, sleep_bytes=1000)  # type: ignore[arg-type]
        self.fake = fake
        self.stopped = False

    @property
    def url(self) -> str:
        return self.fake.url

    async def stop(self) -> None:
        self.stopped = True


class SleepyEngines(FakeEngines):
    """FakeEngines whose engines were launched with sleep mode, as on a GPU."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.launched: list[StandInModelEngine] = []

    async def _launch(self, name: str) -> StandInModelEngine:  # type: ignore[override]
        model = self.catalog.get(name)
        assert model is not None
        self.launched.append(StandInModelEngine(model, self.fakes[name], self._session))
        return self.launched[-1]


async def test_a_swapped_out_model_sleeps_and_is_woken_for_its_next_request(tmp_path: Path) -> None:
    fakes = {"a": FakeEngine(), "b": FakeEngine()}
    for fake in fakes.values():
        await fake.start()
    status_file = tmp_path / "status.json"
    status = StartupStatus(phase=Phase.READY)

    def publish(models: dict[str, dict[str, object]]) -> None:
        status.models = models
        write_status(status_file, status)

    publish({})
    socket = tmp_path / "control.sock"
    async with aiohttp.ClientSession() as session:
        engines = SleepyEngines(ModelCatalog.build(load_settings({}), MODELS), session, max_loaded=1, idle_ttl_s=0,
                                publish=publish, fakes=fakes, host_budget_bytes=10_000)
        serving = asyncio.create_task(engines.serve(socket))
        while not socket.exists():
            await asyncio.sleep(0.01)
        async with running_models_wrapper(str(socket), status_file, MODELS=MODELS) as wrapper:
            async with wrapper.client() as client:
                answers = [await client.post("/v1/chat/completions", json=chat_body(model)) for model in "aba"]
                listing = (await client.get("/v1/models")).json()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await engines.close()
    for fake in fakes.values():
        await fake.stop()

    assert [answer.status_code for answer in answers] == [200, 200, 200], [answer.text for answer in answers]
    assert [engine.model.name for engine in engines.launched] == ["a", "b"]  # a was woken, not started again
    assert [request.path for request in fakes["a"].received if request.path in ("/sleep", "/wake_up")] == [
        "/sleep", "/wake_up"]
    assert [request.path for request in fakes["b"].received if request.path in ("/sleep", "/wake_up")] == ["/sleep"]
    assert {entry["id"]: entry["state"] for entry in listing["data"]} == {"a": "loaded", "b": "sleeping"}


ENGINE_METRICS = (Path(__file__).parent.parent / "fixtures" / "engine_metrics.txt").read_text()


async def test_metrics_hold_every_loaded_engines_series_once(tmp_path: Path) -> None:
    async with serving(tmp_path, max_loaded=2) as deployment:
        for name, fake in deployment.fakes.items():  # a real vLLM scrape, as each model's engine labels it
            fake.metrics_text = ENGINE_METRICS.replace('model_name="tiny-llama"', f'model_name="{name}"')
        async with deployment.wrapper.client() as client:
            before = await client.get("/metrics")
            for model in ("a", "b"):
                assert (await client.post("/v1/chat/completions", json=chat_body(model))).status_code == 200
            after = await client.get("/metrics")

    def families(response: httpx.Response) -> dict[str, Metric]:
        assert response.status_code == 200, response.text
        parsed = list(text_string_to_metric_families(response.text))
        names = [family.name for family in parsed]
        assert len(names) == len(set(names)), "a family appears twice"
        return {family.name: family for family in parsed}

    def models_of(family: Metric) -> set[str]:
        return {sample.labels["model_name"] for sample in family.samples}

    unloaded, loaded = families(before), families(after)
    assert not any(name.startswith("vllm:") for name in unloaded)  # no engine runs yet
    assert [sample.labels for sample in loaded["vllm_api_engine_metrics_up"].samples] == [{"model": "a"}, {"model": "b"}]
    assert all(sample.value == 1.0 for sample in loaded["vllm_api_engine_metrics_up"].samples), loaded["vllm_api_engine_metrics_up"].samples
    engine_families = {family.name for family in text_string_to_metric_families(ENGINE_METRICS)}
    assert engine_families <= loaded.keys()
    for name in ("vllm:num_requests_running", "vllm:prompt_tokens", "process_resident_memory_bytes"):
        assert models_of(loaded[name]) == {"a", "b"}, name
    # The wrapper's own series carry the model that served each request.
    assert {sample.labels["model"] for sample in loaded["vllm_api_requests"].samples} >= {"a", "b"}


class GatedEngines(FakeEngines):
    """FakeEngines whose loads wait for `gate`; a model in `failing` then fails with that sentence."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.failing: dict[str, str] = {}

    async def _launch(self, name: str) -> StandInHandle:  # type: ignore[override]
        await self.gate.wait()
        if name in self.failing:
            raise LoadFailed(self.failing[name])
        return await super()._launch(name)


@pytest_asyncio.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Wrapper, GatedEngines]]:
    fakes = {"a": FakeEngine(), "b": FakeEngine()}
    for fake in fakes.values():
        await fake.start()
    status_file = tmp_path / "status.json"
    write_status(status_file, StartupStatus(phase=Phase.READY))
    catalog = ModelCatalog.build(load_settings({}), MODELS)
    socket = tmp_path / "control.sock"
    async with aiohttp.ClientSession() as session:
        engines = GatedEngines(catalog, session, max_loaded=1, idle_ttl_s=0, publish=lambda _m: None, fakes=fakes)
        serving = asyncio.create_task(engines.serve(socket))
        while not socket.exists():
            await asyncio.sleep(0.01)
        async with running_models_wrapper(str(socket), status_file, MODELS=MODELS, SSE_KEEPALIVE_S="0.05") as wrapper:
            yield wrapper, engines
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await engines.close()
    for fake in fakes.values():
        await fake.stop()


async def read_until_keepalive(response: httpx.Response) -> tuple[AsyncIterator[bytes], bytes]:
    chunks = response.aiter_bytes()
    seen = b""
    while b": keep-alive" not in seen:
        seen += await chunks.__anext__()
    return chunks, seen


async def test_a_stream_waiting_for_its_model_gets_keepalives_then_the_answer(
    gated: tuple[Wrapper, GatedEngines],
) -> None:
    wrapper, engines = gated
    async with wrapper.client() as client:
        async with client.stream("POST", "/v1/chat/completions", json={**chat_body("a"), "stream": True}) as response:
            assert response.status_code == 200
            chunks, seen = await read_until_keepalive(response)
            engines.gate.set()  # the model's engine is there only now
            async for chunk in chunks:
                seen += chunk

    assert seen.startswith(b": keep-alive")
    assert b"Echo:" in seen
    assert seen.endswith(b"data: [DONE]\n\n") and b'"error"' not in seen


async def test_a_stream_whose_model_fails_to_load_ends_with_the_sentence(gated: tuple[Wrapper, GatedEngines]) -> None:
    wrapper, engines = gated
    engines.failing["b"] = "Model 'b' failed to load: its engine ran out of memory."
    async with wrapper.client() as client:
        async with client.stream("POST", "/v1/chat/completions", json={**chat_body("b"), "stream": True}) as response:
            chunks, seen = await read_until_keepalive(response)
            engines.gate.set()
            async for chunk in chunks:
                seen += chunk

    events = [line for line in seen.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["message"]) == ("model_load_failed", "Model 'b' failed to load: its engine ran out of memory.")


async def test_a_stream_whose_model_is_there_at_once_gets_the_engines_own_status(deployment: Deployment) -> None:
    body = {**chat_body("b"), "stream": True, "messages": [{"role": "user", "content": "REFUSE this"}]}
    async with deployment.wrapper.client() as client:
        response = await client.post("/v1/chat/completions", json=body)

    assert response.status_code == 400  # no keep-alive began the stream: the engine's refusal is the answer
    assert response.json()["error"]["message"] == "This prompt is refused."


async def test_operators_list_load_and_unload_models(deployment: Deployment) -> None:
    async with deployment.wrapper.client() as client:
        listed = await client.get("/admin/models")
        loaded = await client.post("/admin/models/load", json={"model": "b"})
        unloaded = await client.post("/admin/models/unload", json={"model": "b"})
        unknown = await client.post("/admin/models/load", json={"model": "c"})

    def states(response: httpx.Response) -> dict[str, str]:
        assert response.status_code == 200, response.text
        return {entry["id"]: entry["state"] for entry in response.json()["data"]}

    assert states(listed) == {"a": "unloaded", "b": "unloaded"}
    assert states(loaded) == {"a": "unloaded", "b": "loaded"}
    assert states(unloaded) == {"a": "unloaded", "b": "unloaded"}
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    # They take the API key whatever PUBLIC_METRICS says, and never an engine slot.
    for path in ("/admin/models", "/admin/models/load", "/admin/models/unload"):
        route = build_route_table().match(path)
        assert (route.access, route.admitted) == ("key", False)


async def test_admin_model_routes_say_they_need_models() -> None:
    engine = FakeEngine()
    await engine.start()
    try:
        async with running_wrapper(engine.url) as wrapper, wrapper.client() as client:
            response = await client.get("/admin/models")
    finally:
        await engine.stop()
    assert response.status_code == 404 and "MODELS" in response.json()["error"]["message"]


async def test_info_describes_each_model_and_what_sets_it_apart(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("b:\n  IMAGE_LIMIT: 0\n")
    async with serving(tmp_path, MODELS_CONFIG=str(config), IMAGE_LIMIT="1", API_KEY="sk-info") as deployment:
        async with deployment.wrapper.client(headers={"Authorization": "Bearer sk-info"}) as client:
            assert (await client.post("/v1/chat/completions", json=chat_body("b"))).status_code == 200
            info = (await client.get("/info")).json()
            anonymous = await client.get("/info", headers={"Authorization": ""})

    a, b = info["models"]["a"], info["models"]["b"]
    assert (a["model"], a["state"], a["max_model_len"], a["media_limits"]) == ("org/a", "unloaded", None, {"image": 1, "video": 1})
    assert (b["model"], b["state"], b["max_model_len"], b["media_limits"]) == ("org/b", "loaded", 2048, {"image": 0, "video": 1})
    assert b["config"]["IMAGE_LIMIT"] == 0 and b["config"]["SERVED_MODEL_NAME"] == "b" and "IMAGE_LIMIT" not in a["config"]
    assert info["config"]["API_KEY"] == "**********" and "sk-info" not in json.dumps(info)
    assert anonymous.status_code == 401
