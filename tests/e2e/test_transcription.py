"""Speech to text on the CPU engine: a tiny random Whisper transcribes a WAV file.

The pinned vLLM's CPU build serves Whisper (audio decoded with PyAV); the
random weights transcribe a 440 Hz tone into noise, so the tests check the
shape of the answer, its language and the clip's duration. The first test
goes straight to the engine (what the CPU build can do); the second goes
through the wrapper, which must relay the multipart body. The stack serves
this module only.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from test_api import sample_wav
from tests.e2e.clients import openai_client
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

MODEL = "tiny-whisper"


@pytest.fixture(scope="module")
def whisper_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(model_dir(MODEL), port=port(37), vllm_port=port(38), log_path=logs_dir / "whisper.log")
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def transcribe(client: openai.OpenAI) -> None:
    reply = client.audio.transcriptions.create(
        model=MODEL, file=("tone.wav", sample_wav(), "audio/wav"), language="en", response_format="verbose_json",
    )
    assert isinstance(reply.text, str) and reply.language == "en"
    assert reply.duration == pytest.approx(1.0, abs=0.05)


def test_the_cpu_engine_serves_whisper(whisper_stack: Stack) -> None:
    transcribe(openai.OpenAI(base_url=f"{whisper_stack.engine_url}/v1", api_key="unused", max_retries=0, timeout=180))


def test_a_transcription_through_the_wrapper(whisper_stack: Stack) -> None:
    transcribe(openai_client(whisper_stack))
