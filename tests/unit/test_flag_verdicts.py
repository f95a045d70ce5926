"""The full engine-flag check runs once per configuration: its verdict is kept on the volume.

The last test runs the real check (vLLM's parser in a child process, tens of
seconds of CPU) once, and proves that the supervisor's second start with the
same settings gets the same sentence without starting the child again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from app.config import load_settings
from app.lifecycle import supervisor as supervisor_module
from app.lifecycle.flag_check import check_argv
from app.lifecycle.flag_verdicts import Verdict, kept_or_checked, load_verdict, verdict_key, verdict_path
from app.lifecycle.supervisor import Supervisor

SENTENCE = "TOOL_CALL_PARSER='hermess' (--tool-call-parser) is not a tool-call parser of vLLM 0.32.0: did you mean `hermes`?"


def key_for(env: dict[str, str], version: str = "0.32.0", plugins: tuple[str, ...] = ()) -> dict[str, object]:
    """The key the supervisor computes for a container started with `env`."""
    settings = load_settings({"MODEL_NAME": "org/model", **env})
    return verdict_key(version=version, plugins=plugins, device="cpu", argv=check_argv(settings),
                       env={"MODEL_NAME": "org/model", **env})


class Check:
    """Counts how often the full check is asked for; answers `verdict`."""

    def __init__(self, verdict: Verdict | None) -> None:
        self.verdict = verdict
        self.calls = 0

    async def __call__(self) -> Verdict | None:
        self.calls += 1
        return self.verdict


def test_a_second_start_with_the_same_configuration_uses_the_kept_verdict(tmp_path: Path) -> None:
    path = verdict_path(tmp_path, key_for({"MAX_MODEL_LEN": "2048"}))
    first, second = Check(Verdict(SENTENCE)), Check(Verdict(None))
    assert asyncio.run(kept_or_checked(path, "0.32.0", first)) == Verdict(SENTENCE)
    assert asyncio.run(kept_or_checked(path, "0.32.0", second)) == Verdict(SENTENCE)
    assert (first.calls, second.calls) == (1, 0)
    assert path.is_relative_to(tmp_path / "vllm-flag-checks" / "0.32.0"), "beside the compile cache, per vLLM version"


def test_an_accepted_command_line_is_kept_too(tmp_path: Path) -> None:
    path = verdict_path(tmp_path, key_for({}))
    asyncio.run(kept_or_checked(path, "0.32.0", Check(Verdict(None))))
    again = Check(Verdict(SENTENCE))
    assert asyncio.run(kept_or_checked(path, "0.32.0", again)) == Verdict(None) and again.calls == 0


@pytest.mark.parametrize("changed", [
    {"MAX_MODEL_LEN": "4096"},  # a named setting: another flag value
    {"VLLM_EXTRA_ARGS": "--max-num-seqs 8"},  # another flag
    {"VLLM_USE_V2": "1"},  # a variable vLLM reads
    {"TOOL_CALL_PARSER": "hermes", "ENABLE_AUTO_TOOL_CHOICE": "true"},
])
def test_a_changed_setting_or_flag_runs_the_check_again(tmp_path: Path, changed: dict[str, str]) -> None:
    before = {"MAX_MODEL_LEN": "2048"}
    path = verdict_path(tmp_path, key_for(before))
    asyncio.run(kept_or_checked(path, "0.32.0", Check(Verdict(None))))
    check = Check(Verdict(SENTENCE))
    assert asyncio.run(kept_or_checked(verdict_path(tmp_path, key_for({**before, **changed})), "0.32.0", check)) \
        == Verdict(SENTENCE)
    assert check.calls == 1


@pytest.mark.parametrize("other", [{"version": "0.33.0"}, {"plugins": ("resolver=my_plugin:register",)}])
def test_another_vllm_or_plugin_runs_the_check_again(tmp_path: Path, other: dict[str, object]) -> None:
    asyncio.run(kept_or_checked(verdict_path(tmp_path, key_for({})), "0.32.0", Check(Verdict(None))))
    check = Check(Verdict(SENTENCE))
    path = verdict_path(tmp_path, key_for({}, **other))  # type: ignore[arg-type]
    assert asyncio.run(kept_or_checked(path, str(other.get("version", "0.32.0")), check)) == Verdict(SENTENCE)
    assert check.calls == 1


def test_what_differs_between_containers_and_is_not_read_keeps_the_key(tmp_path: Path) -> None:
    """A new worker on the same volume (another hostname, pod id) finds the verdict."""
    assert key_for({"HOSTNAME": "worker-a", "RUNPOD_POD_ID": "a1"}) == key_for({"HOSTNAME": "worker-b", "RUNPOD_POD_ID": "b2"})


@pytest.mark.parametrize("content", ["{not json", '{"vllm": "0.32.0"}', '{"refusal": 3}', "[]", ""])
def test_a_corrupt_kept_verdict_runs_the_check_and_is_replaced(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = verdict_path(tmp_path, key_for({}))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    check = Check(Verdict(SENTENCE))
    assert asyncio.run(kept_or_checked(path, "0.32.0", check)) == Verdict(SENTENCE) and check.calls == 1
    assert load_verdict(path) == Verdict(SENTENCE)
    assert any("cannot be read" in record.getMessage() for record in caplog.records)


def test_a_volume_that_cannot_be_written_still_gets_the_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "vllm-flag-checks").write_text("a file where the folder should be")  # fails for root too
    path = verdict_path(tmp_path, key_for({}))
    check = Check(Verdict(SENTENCE))
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(kept_or_checked(path, "0.32.0", check)) == Verdict(SENTENCE)
    assert check.calls == 1 and not path.exists()
    assert any("cannot be kept" in record.getMessage() for record in caplog.records)


def test_a_check_that_could_not_run_is_not_kept(tmp_path: Path) -> None:
    path = verdict_path(tmp_path, key_for({}))
    assert asyncio.run(kept_or_checked(path, "0.32.0", Check(None))) is None
    check = Check(Verdict(SENTENCE))
    assert asyncio.run(kept_or_checked(path, "0.32.0", check)) == Verdict(SENTENCE) and check.calls == 1


def test_the_supervisor_runs_the_real_check_once_per_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"MODEL_NAME": "org/model", "TOOL_CALL_PARSER": "hermess", "HF_HOME": str(tmp_path / "hf"),
           "CACHE_VOLUMES": str(tmp_path / "no-volume")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    children = []
    real_check = supervisor_module.check_engine_flags

    async def counted(*args: object, **kwargs: object) -> Verdict | None:
        children.append(1)
        return await real_check(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor_module, "check_engine_flags", counted)
    sentences = []
    for restart in range(2):
        (tmp_path / f"run-{restart}").mkdir()
        supervisor = Supervisor(load_settings(), tmp_path / f"run-{restart}")
        sentences.append(asyncio.run(supervisor._check_engine_flags()))
    assert sentences[0] is not None and "did you mean `hermes`?" in sentences[0]
    assert sentences[1] == sentences[0] and len(children) == 1
    assert list((tmp_path / "hf" / "vllm-flag-checks").glob("*/*.json"))
