"""A real instruct model (SmolLM2-135M-Instruct, converted offline) and a clean stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from tests.stack import SMOLLM2_ENV, Stack, kill_tree, model_dir, port, start_stack


@pytest.fixture(scope="module")
def smol_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir("smollm2-135m-instruct"), port=port(21), vllm_port=port(22), log_path=logs_dir / "smol.log",
        extra_env={"MAX_MODEL_LEN": "1024", "VLLM_CPU_KVCACHE_SPACE": "1", **SMOLLM2_ENV},
    )
    yield stack
    stack.stop(signal.SIGTERM)
    kill_tree(stack.process.pid)


def test_smollm2_knows_the_capital_of_france(smol_stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{smol_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",  # a local directory is served under its folder name
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content


def test_streaming_chunks_arrive_as_they_are_generated(smol_stack: Stack) -> None:
    """A real model decodes at tens of tokens per second: a relaying proxy spreads the chunks out."""
    client = openai.OpenAI(base_url=f"{smol_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = time.perf_counter()
    arrivals = []
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=80, temperature=0, stream=True, extra_body={"min_tokens": 80, "ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 20
    # A buffering proxy hands every chunk over at the end, all at once.
    assert arrivals[-1] - arrivals[0] > 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_sigterm_stops_every_process_and_exits_0(smol_stack: Stack) -> None:
    processes = [psutil.Process(smol_stack.process.pid), *smol_stack.descendants()]
    assert len(processes) >= 3, "expected supervisor, wrapper and engine processes"
    code = smol_stack.stop(signal.SIGTERM, timeout_s=60)
    assert code == 0
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, [p.pid for p in alive]
