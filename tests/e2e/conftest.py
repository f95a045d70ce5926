"""Shared end-to-end stacks on the real CPU engine.

Every engine start costs 30-40 s on two cores, so each model's stack starts
once per session (the first test that asks for it) and is shared. Tests that
need different wrapper settings start a wrapper-only instance
(`ENGINE_URL`) in front of an already running engine: that takes about a
second.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, kill_tree, model_dir, port, start_stack

TEXT_MODEL = "tiny-chat"
VLM_MODEL = "tiny-vl"
_ports = itertools.count(port(100), 2)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack-logs")


def _stop(stack: Stack) -> None:
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


@pytest.fixture(scope="session")
def text_stack(logs_dir: Path) -> Iterator[Stack]:
    """Tiny random-weight Llama behind the full stack, served as `tiny-chat`."""
    stack = start_stack(
        model_dir("tiny-llama"), port=port(1), vllm_port=port(2), log_path=logs_dir / "text.log",
        extra_env={"SERVED_MODEL_NAME": TEXT_MODEL, "MAX_MODEL_LEN": "2048", "MAX_NUM_SEQS": "64"},
    )
    yield stack
    _stop(stack)


@pytest.fixture(scope="session")
def vlm_stack(logs_dir: Path) -> Iterator[Stack]:
    """Tiny random-weight Qwen2-VL, two images and one video per prompt."""
    stack = start_stack(
        model_dir("tiny-qwen2-vl"), port=port(11), vllm_port=port(12), log_path=logs_dir / "vlm.log",
        extra_env={
            "SERVED_MODEL_NAME": VLM_MODEL, "MAX_MODEL_LEN": "2048", "IMAGE_LIMIT": "2", "VIDEO_LIMIT": "1",
            "MAX_IMAGE_SIDE": "256", "ALLOW_PRIVATE_MEDIA_URLS": "true",
        },
    )
    yield stack
    _stop(stack)


@pytest.fixture
def wrapper(logs_dir: Path) -> Iterator[Callable[..., Stack]]:
    """Start wrapper-only instances (ENGINE_URL) in front of a running engine."""
    started: list[Stack] = []

    def start(engine_url: str, wait: bool = True, **env: str) -> Stack:
        port = next(_ports)
        stack = start_stack(
            "unused-in-wrapper-only-mode", port=port, vllm_port=port + 1,
            log_path=logs_dir / f"wrapper-{port}.log", extra_env={"ENGINE_URL": engine_url, **env}, wait=wait,
        )
        started.append(stack)
        return stack

    yield start
    for stack in started:
        _stop(stack)
