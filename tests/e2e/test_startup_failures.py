"""A start that cannot succeed fails fast, with one sentence that names the variable to fix.

Three kinds of failure are started through `scripts/start.sh`, as a user would:

- The Hub refuses the model (gated without a token, a refused token, a missing
  repository, an unknown MODEL_REVISION). The Hugging Face Hub cannot be reached
  from the test machines, so a local test double of the Hub (`tests/fakehub.py`,
  on 127.0.0.1) gives the Hub's answers. The preflight fails before any engine
  starts, so each case ends within 15 s: with ON_STARTUP_FAILURE=exit the process
  exits non-zero after one error line; by default (serve) it keeps running and
  answers /health, /ping and the API with 503 and the sentence.
- The real engine refuses the configuration (MAX_MODEL_LEN above the model's
  2048 positions): the engine's output becomes the same kind of sentence. A
  refusal the image does not recognise says how the engine exited; the
  engine's own lines stay out of the unauthenticated /health and /ping.
- The real engine's KV cache cannot hold the requested context: the retry
  changes only the context length, to what the engine estimated would fit,
  /health says so, and the model serves. Each attempt's configuration keeps its
  compile cache in its own folder on the volume.
- The fit check: a model whose weights, or whose KV cache for one sequence of
  MAX_MODEL_LEN, cannot fit the memory the test gives the engine is refused
  from its config.json and the Hub's file sizes, before a byte of its weights
  is downloaded; one that fits goes on to its download.

An HF_TOKEN the Hub refuses appears nowhere: not in the log, /health, /info or
an error response.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fakehub import FakeHub, hub_environment
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

PUBLIC_MODEL = "org/tiny-llama"
GATED_MODEL = "org/gated-llama"
# The tiny Llama's files under a config of Llama 3 8B's shape: 128 KiB of KV cache per token.
LONG_CONTEXT_MODEL = "org/llama-shaped"
# Listed with 4 TiB of weights: more than any machine this runs on has memory.
HUGE_MODEL = "org/huge-llama"
TIB = 1024**4
ACCEPTED_TOKEN = "hf_accepted_token_456"
REFUSED_TOKEN = "hf_wrong_secret_123"
# The bound for a fatal Hub answer, from the start command to the failure.
FAST_FAILURE_S = 15.0
ENGINE_FAILURE_TIMEOUT_S = 240.0
POLL_S = 0.2


@dataclass(frozen=True)
class HubRefusal:
    env: dict[str, str]
    variable: str  # the variable the sentence must tell the user to fix
    words: str  # what the sentence must say about the cause


# HF_TOKEN "" keeps a token from the test runner's environment out of these starts.
HUB_REFUSALS = {
    "gated model without a token": HubRefusal({"MODEL_NAME": GATED_MODEL, "HF_TOKEN": ""}, "HF_TOKEN", "gated"),
    "gated model with a refused token": HubRefusal(
        {"MODEL_NAME": GATED_MODEL, "HF_TOKEN": REFUSED_TOKEN}, "HF_TOKEN", "refused"
    ),
    "missing repository": HubRefusal(
        {"MODEL_NAME": "org/no-such-model", "HF_TOKEN": ""}, "MODEL_NAME", "does not exist"
    ),
    "unknown revision": HubRefusal(
        {"MODEL_NAME": PUBLIC_MODEL, "MODEL_REVISION": "v9", "HF_TOKEN": ""}, "MODEL_REVISION", "'v9' does not exist"
    ),
}


def llama_shaped(tiny: Path, out: Path) -> Path:
    """The tiny model's files with the attention shape of Llama 3 8B in config.json (never loaded)."""
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config.update(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=131072)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    tiny = model_dir("tiny-llama")
    shaped = llama_shaped(tiny, tmp_path_factory.mktemp("models") / "llama-shaped")
    with FakeHub(
        {PUBLIC_MODEL: tiny, GATED_MODEL: tiny, LONG_CONTEXT_MODEL: shaped, HUGE_MODEL: tiny},
        gated={GATED_MODEL},
        tokens={ACCEPTED_TOKEN: {GATED_MODEL}},
        declared_sizes={HUGE_MODEL: {"model.safetensors": 4 * TIB}},
    ) as fake:
        yield fake


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    """Stacks a test started; each is stopped (and its tree killed) afterwards."""
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop(signal.SIGKILL, timeout_s=10)
        kill_tree(stack.process.pid)


def start_refused(hub: FakeHub, hf_home: Path, refusal: HubRefusal, log_path: Path, **env: str) -> Stack:
    model = refusal.env["MODEL_NAME"]
    extra_env = {**hub_environment(hub), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", **refusal.env, **env}
    return start_stack(model, port=port(91), vllm_port=port(92), log_path=log_path, extra_env=extra_env, wait=False)


def wait_for_exit(stack: Stack, started: float, timeout_s: float) -> float:
    """Seconds from `started` until the stack exited; fails if it is still running after timeout_s."""
    deadline = started + timeout_s
    while stack.process.poll() is None:
        assert time.monotonic() < deadline, f"still running after {timeout_s}s:\n{stack.raw_log()[-3000:]}"
        time.sleep(POLL_S)
    return time.monotonic() - started


def wait_for_failed_phase(stack: Stack, started: float, timeout_s: float) -> httpx.Response:
    """The first /health answer with phase failed; fails if none came within timeout_s of `started`."""
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        assert stack.process.poll() is None, f"exited with {stack.process.returncode}:\n{stack.raw_log()[-3000:]}"
        try:
            response = httpx.get(f"{stack.base_url}/health", timeout=2)
            if response.json()["phase"] == "failed":
                return response
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise AssertionError(f"no failed phase after {timeout_s}s:\n{stack.raw_log()[-3000:]}")


def error_lines(stack: Stack) -> list[dict[str, object]]:
    return [line for line in stack.logs() if line["level"] in ("ERROR", "CRITICAL")]


def startup_failure_line(stack: Stack) -> dict[str, object]:
    lines = [line for line in error_lines(stack) if line["message"] == "startup failed"]
    assert len(lines) == 1, lines
    return lines[0]


def chat(stack: Stack, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)


def assert_serves_the_failure(stack: Stack, health: httpx.Response, model: str) -> str:
    """/health, /ping and the API all answer 503 with the sentence; returns the sentence."""
    assert health.status_code == 503
    sentence = health.json()["error"]
    assert isinstance(sentence, str) and sentence
    ping = httpx.get(f"{stack.base_url}/ping", timeout=5)
    assert ping.status_code == 503 and ping.json()["error"] == sentence
    reply = chat(stack, model)
    assert reply.status_code == 503
    assert sentence in reply.json()["error"]["message"]
    return sentence


def assert_stops_cleanly(stack: Stack) -> None:
    """SIGTERM ends the stack with exit code 0 and no child process left behind."""
    children = stack.descendants()
    assert stack.stop(signal.SIGTERM, timeout_s=60) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, alive


# --- The Hub refuses the model: the preflight fails before any engine starts -------------


@pytest.mark.parametrize("refusal", HUB_REFUSALS.values(), ids=HUB_REFUSALS.keys())
def test_a_hub_refusal_exits_non_zero_within_15_s_with_one_error_line(
    hub: FakeHub, refusal: HubRefusal, stacks: list[Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_refused(hub, tmp_path / "hf-home", refusal, tmp_path / "stack.log", ON_STARTUP_FAILURE="exit")
    stacks.append(stack)

    seconds = wait_for_exit(stack, started, FAST_FAILURE_S)

    assert stack.process.returncode != 0, f"exit code 0 after {seconds:.1f}s"
    errors = error_lines(stack)
    assert len(errors) == 1, errors
    sentence = str(errors[0]["error"])
    assert refusal.variable in sentence and refusal.words in sentence, sentence


@pytest.mark.parametrize("refusal", HUB_REFUSALS.values(), ids=HUB_REFUSALS.keys())
def test_a_hub_refusal_is_served_as_503_with_the_sentence_by_default(
    hub: FakeHub, refusal: HubRefusal, stacks: list[Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_refused(hub, tmp_path / "hf-home", refusal, tmp_path / "stack.log")
    stacks.append(stack)

    health = wait_for_failed_phase(stack, started, FAST_FAILURE_S)

    sentence = assert_serves_the_failure(stack, health, refusal.env["MODEL_NAME"])
    assert refusal.variable in sentence and refusal.words in sentence, sentence
    assert not any("vllm.entrypoints" in " ".join(child.cmdline()) for child in stack.descendants())
    time.sleep(2)  # a container that stops here would restart in a loop instead of showing the error
    assert stack.process.poll() is None, "the process exited although ON_STARTUP_FAILURE defaults to serve"
    assert_stops_cleanly(stack)


def test_a_refused_hf_token_appears_nowhere(hub: FakeHub, stacks: list[Stack], tmp_path: Path) -> None:
    refusal = HUB_REFUSALS["gated model with a refused token"]
    started = time.monotonic()
    stack = start_refused(hub, tmp_path / "hf-home", refusal, tmp_path / "stack.log")
    stacks.append(stack)
    health = wait_for_failed_phase(stack, started, FAST_FAILURE_S)

    answers = [
        health.text,
        httpx.get(f"{stack.base_url}/ping", timeout=5).text,
        httpx.get(f"{stack.base_url}/info", timeout=5).text,
        chat(stack, GATED_MODEL).text,
        httpx.get(f"{stack.base_url}/v1/models", timeout=5).text,
    ]
    assert stack.stop(signal.SIGTERM, timeout_s=30) == 0

    assert "HF_TOKEN" in health.json()["error"]
    for text in [*answers, stack.raw_log()]:
        assert REFUSED_TOKEN not in text


# --- The real engine refuses the configuration --------------------------------------------


def test_a_context_above_the_models_limit_is_served_as_the_classifiers_sentence(
    stacks: list[Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_stack(
        model_dir("tiny-llama"),
        port=port(93),
        vllm_port=port(94),
        log_path=tmp_path / "serve.log",
        extra_env={"MAX_MODEL_LEN": "100000", "SERVED_MODEL_NAME": "tiny-chat"},
        wait=False,
    )
    stacks.append(stack)

    health = wait_for_failed_phase(stack, started, ENGINE_FAILURE_TIMEOUT_S)

    sentence = assert_serves_the_failure(stack, health, "tiny-chat")
    assert "MAX_MODEL_LEN=100000" in sentence and "set MAX_MODEL_LEN to 2048 or less" in sentence, sentence
    assert str(startup_failure_line(stack)["error"]) == sentence
    assert "User-specified max_model_len" in stack.raw_log()
    assert "User-specified max_model_len" not in health.text  # the engine's own line stays in the log
    assert_stops_cleanly(stack)


def test_an_unrecognised_engine_failure_says_how_the_engine_exited_and_keeps_its_lines_private(
    stacks: list[Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_stack(
        model_dir("tiny-llama"),
        port=port(85),
        vllm_port=port(86),
        log_path=tmp_path / "unrecognised.log",
        # The engine's configuration check refuses this with a traceback no describer knows.
        extra_env={"VLLM_EXTRA_ARGS": """--speculative-config '{"method": "bogus"}'""", "SERVED_MODEL_NAME": "tiny-chat"},
        wait=False,
    )
    stacks.append(stack)

    health = wait_for_failed_phase(stack, started, ENGINE_FAILURE_TIMEOUT_S)

    sentence = assert_serves_the_failure(stack, health, "tiny-chat")
    assert sentence.startswith("The engine exited with code 1 during startup"), sentence
    assert "engine_log_tail" in sentence  # where to look
    engine_words = ("ValidationError", "SpeculativeConfig", "Traceback")
    assert all(word in stack.raw_log() for word in engine_words)
    ping = httpx.get(f"{stack.base_url}/ping", timeout=5)
    for answer in (health.text, ping.text):
        assert not any(word in answer for word in engine_words), answer
    # The engine's last lines are in /info, which takes the key when API_KEY is set.
    tail = httpx.get(f"{stack.base_url}/info", timeout=30).json()["engine_log_tail"]
    assert any("ValidationError" in line for line in tail), tail
    assert_stops_cleanly(stack)


def test_a_context_above_the_models_limit_exits_non_zero_with_on_startup_failure_exit(
    stacks: list[Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    stack = start_stack(
        model_dir("tiny-llama"),
        port=port(95),
        vllm_port=port(96),
        log_path=tmp_path / "exit.log",
        extra_env={"MAX_MODEL_LEN": "100000", "ON_STARTUP_FAILURE": "exit"},
        wait=False,
    )
    stacks.append(stack)

    wait_for_exit(stack, started, ENGINE_FAILURE_TIMEOUT_S)

    assert stack.process.returncode != 0
    assert "MAX_MODEL_LEN" in str(startup_failure_line(stack)["error"])


# --- The fit check: refused before the download -------------------------------------------

FIT_REFUSALS = {
    "a context whose KV cache exceeds VLLM_CPU_KVCACHE_SPACE": HubRefusal(
        {"MODEL_NAME": LONG_CONTEXT_MODEL, "MAX_MODEL_LEN": "32768", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_TOKEN": ""},
        "MAX_MODEL_LEN",
        "set MAX_MODEL_LEN to 8192 or less",
    ),
    "weights larger than the machine": HubRefusal(
        {"MODEL_NAME": HUGE_MODEL, "HF_TOKEN": ""}, "QUANTIZATION", "needs about 4096.0 GiB for its weights"
    ),
}


def weight_bytes_served(hub: FakeHub) -> int:
    return sum(count for path, count in hub.bytes_served.items() if path.endswith(".safetensors"))


@pytest.mark.parametrize("refusal", FIT_REFUSALS.values(), ids=FIT_REFUSALS.keys())
def test_a_model_that_cannot_fit_is_refused_before_its_download(
    hub: FakeHub, refusal: HubRefusal, stacks: list[Stack], tmp_path: Path
) -> None:
    hub.reset_counters()
    started = time.monotonic()
    stack = start_refused(hub, tmp_path / "hf-home", refusal, tmp_path / "stack.log")
    stacks.append(stack)

    health = wait_for_failed_phase(stack, started, ENGINE_FAILURE_TIMEOUT_S)

    sentence = assert_serves_the_failure(stack, health, refusal.env["MODEL_NAME"])
    assert refusal.variable in sentence and refusal.words in sentence, sentence
    assert weight_bytes_served(hub) == 0 and set(hub.bytes_served) <= {"config.json"}
    assert "downloading" not in health.json()["phase_seconds"]
    assert not any("vllm.entrypoints" in " ".join(child.cmdline()) for child in stack.descendants())
    assert_stops_cleanly(stack)


def test_a_model_that_fits_goes_on_to_its_download(hub: FakeHub, stacks: list[Stack], tmp_path: Path) -> None:
    fits = HubRefusal({"MODEL_NAME": LONG_CONTEXT_MODEL, "MAX_MODEL_LEN": "8192", "HF_TOKEN": ""}, "", "")
    hub.reset_counters()
    stack = start_refused(hub, tmp_path / "hf-home", fits, tmp_path / "stack.log", VLLM_CPU_KVCACHE_SPACE="1")
    stacks.append(stack)

    deadline = time.monotonic() + ENGINE_FAILURE_TIMEOUT_S
    while not any(line["message"] == "download finished" for line in stack.logs()):
        assert time.monotonic() < deadline and stack.process.poll() is None, stack.raw_log()[-3000:]
        time.sleep(POLL_S)

    (passed,) = [line for line in stack.logs() if line["message"] == "fit check passed"]
    assert passed["kv_gib_one_sequence"] == 1.0  # 8192 tokens of 128 KiB: exactly VLLM_CPU_KVCACHE_SPACE
    assert weight_bytes_served(hub) > 0


# --- The KV cache cannot hold the context: a retry with what fits --------------------------


def test_a_kv_cache_too_small_is_retried_with_the_context_length_the_engine_estimated(
    stacks: list[Stack], tmp_path: Path
) -> None:
    # The tiny model needs 512 bytes of KV cache per token: only a context of millions of
    # tokens overflows the smallest cache (1 GiB), and the model must claim that many positions.
    # The fit check would refuse this before the engine starts; FIT_CHECK=false lets the engine
    # meet it, as it would a model whose needs the check cannot estimate.
    requested = 4 * 1024 * 1024
    overrides = json.dumps({"max_position_embeddings": requested})
    volume = tmp_path / "volume"
    volume.mkdir()
    stack = start_stack(
        model_dir("tiny-llama"),
        port=port(97),
        vllm_port=port(98),
        log_path=tmp_path / "retry.log",
        extra_env={
            "MAX_MODEL_LEN": str(requested),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "SERVED_MODEL_NAME": "tiny-chat",
            "VLLM_EXTRA_ARGS": f"--hf-overrides {shlex.quote(overrides)}",
            "FIT_CHECK": "false",
            "CACHE_VOLUMES": str(volume),
        },
    )
    stacks.append(stack)

    estimates = {int(m[1]) for m in re.finditer(r"the estimated maximum model length is (\d+)", stack.raw_log())}
    assert len(estimates) == 1, estimates
    fitting = estimates.pop()
    retries = [line for line in stack.logs() if str(line["message"]).startswith("engine ran out of memory")]
    assert len(retries) == 1, retries
    assert retries[0]["changed"] == [{"setting": "MAX_MODEL_LEN", "from": requested, "to": fitting}]
    health = httpx.get(f"{stack.base_url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["phase"] == "ready"
    (adjustment,) = health.json()["startup_adjustments"]
    assert adjustment["setting"] == "MAX_MODEL_LEN" and (adjustment["from"], adjustment["to"]) == (requested, fitting)
    assert "--enforce-eager" in stack.raw_log()  # the test stacks' own choice, not something the retry added
    assert httpx.get(f"{stack.base_url}/info", timeout=10).json()["max_model_len"] == fitting
    assert chat(stack, "tiny-chat").status_code == 200
    # Two flag sets, two compile-cache folders, each written by its own engine.
    cache = volume / "huggingface-cache" / "vllm-cache"
    folders = [folder for version in cache.iterdir() for folder in version.iterdir()]
    assert all((folder / "modelinfos").is_dir() for folder in folders)
    flags = [json.loads((folder / "key.json").read_text())["flags"] for folder in folders]
    lengths = {words[words.index("--max-model-len") + 1] for words in flags}
    assert len(folders) == 2 and lengths == {str(requested), str(fitting)}
