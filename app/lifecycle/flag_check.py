"""Check the whole engine command line against the pinned vLLM before any Hub request or download.

Every engine flag can be set by environment (named settings and
VLLM_EXTRA_ARGS), so a typo, a value the engine refuses, a parser name it does
not know or a flag that a vLLM upgrade removed would otherwise surface after
the download, as an argparse usage dump among the engine's start-up lines.
Here a refusal becomes one sentence naming the setting to fix and, for a
misspelling, the closest valid name. Two checks share the sentences:

- The spot check (`spot_refusal`) runs in the supervisor in milliseconds,
  before the Hub is asked anything. It reads `engine_flags.json`, the facts of
  the pinned vLLM (every flag, the values of flags with choices, which flags
  take JSON, the registered tool-call and reasoning parsers, quantization
  methods and weight formats, the keys of the speculative config), written by
  `tools/engine_flag_facts.py` and kept current by a unit test. It catches
  unknown and ambiguous flags, bad choices, malformed JSON, unknown names and
  flags the image sets itself. With another vLLM installed it steps aside.
- The full check (`refusal`) has the pinned vLLM's own parser
  (`make_arg_parser`, `validate_parsed_serve_args`) judge the command line,
  which also catches bad numbers, switches given a value, words that belong to
  no flag and a chat template that is neither a file nor a template. Importing
  that parser costs seconds of CPU and about 600 MB, so it runs in a
  short-lived child process (`check_engine_flags`), never in the supervisor or
  the wrappers, while the Hub metadata is fetched or a local model loads; the
  download and the engine's readiness wait for its verdict. A check that
  cannot run (a crash, a timeout) is logged and skipped: the engine then
  judges the flags itself. Its verdict is kept on the volume
  (flag_verdicts.py), so a restart with the same configuration skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib.util
import json
import logging
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from app.config import SECRET_SETTINGS, Settings, load_settings
from app.lifecycle.engine_args import SETTING_OF_FLAG, build_engine_args
from app.lifecycle.flag_verdicts import Verdict
from app.lifecycle.processes import die_with_parent

log = logging.getLogger("app.lifecycle")

FACTS_FILE = Path(__file__).with_name("engine_flags.json")
RESULT_PREFIX = "engine-flag-check: "
CHECK_TIMEOUT_S = 300.0
# Flags the image sets from its own settings; VLLM_EXTRA_ARGS must not move them.
MANAGED_FLAGS = {"--model": "MODEL_NAME", "--port": "VLLM_PORT", "--host": None, "--served-model-name": "SERVED_MODEL_NAME"}
# A flag whose registered names a plugin flag extends: then any name may be right.
PLUGIN_OF = {"--tool-call-parser": "--tool-parser-plugin", "--reasoning-parser": "--reasoning-parser-plugin"}
NAME_KINDS = {
    "--tool-call-parser": "a tool-call parser",
    "--reasoning-parser": "a reasoning parser",
    "--quantization": "a quantization method",
    "--load-format": "a weights format",
}
SPECULATIVE_EXAMPLE = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'
ARGUMENT_ERROR = re.compile(r"^argument (?P<flags>\S+): (?P<detail>.*)$", re.DOTALL)
VERSION_LINE = re.compile(r"""^__version__\s*=.*?['"]([^'"]+)['"]""", re.MULTILINE)


@dataclass(frozen=True)
class EngineFacts:
    """What the pinned vLLM's command line accepts, as plain names (no vLLM import to read them)."""

    version: str
    flags: tuple[str, ...]  # every long option, --no-* forms included
    choices: dict[str, list[str]] = field(default_factory=dict)  # flag -> the values it accepts
    json_flags: tuple[str, ...] = ()  # flags whose value is JSON
    names: dict[str, list[str]] = field(default_factory=dict)  # flag -> registered names (see NAME_KINDS)
    speculative_keys: tuple[str, ...] = ()

    @classmethod
    def from_engine(cls, parser: argparse.ArgumentParser) -> EngineFacts:
        """Read from the installed vLLM (imports it: seconds)."""
        from vllm import __version__ as version
        from vllm.config import SpeculativeConfig
        from vllm.model_executor import model_loader
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
        from vllm.plugins import load_general_plugins
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        load_general_plugins()  # as the engine does: plugins may register parsers, loaders, quantization methods
        actions = parser._option_string_actions
        return cls(
            version=version,
            flags=tuple(sorted(flag for flag in actions if flag.startswith("--"))),
            choices={
                flag: sorted(str(choice) for choice in action.choices)
                for flag, action in sorted(actions.items()) if flag.startswith("--") and action.choices
            },
            json_flags=tuple(sorted(flag for flag, action in actions.items() if flag.startswith("--") and _takes_json(action))),
            names={
                "--tool-call-parser": sorted(ToolParserManager.list_registered()),
                "--reasoning-parser": sorted(ReasoningParserManager.list_registered()),
                "--quantization": sorted(QUANTIZATION_METHODS),
                "--load-format": sorted(model_loader._LOAD_FORMAT_TO_MODEL_LOADER),  # the registry, plugins included
            },
            speculative_keys=tuple(sorted(SpeculativeConfig.__dataclass_fields__)),
        )

    @classmethod
    def load(cls, path: Path = FACTS_FILE) -> EngineFacts | None:
        """The recorded facts, when they describe the installed vLLM; None otherwise."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("version") != installed_vllm_version():
            return None
        return cls(**{**data, "flags": tuple(data["flags"]), "json_flags": tuple(data["json_flags"]),
                      "speculative_keys": tuple(data["speculative_keys"])})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"


def installed_vllm_version() -> str | None:
    """vLLM's version, read from its `_version.py` without importing the package."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "_version.py").read_text()
    except OSError:
        return None
    match = VERSION_LINE.search(text)
    return match[1] if match else None


def _takes_json(action: argparse.Action) -> bool:
    parse = action.type
    if getattr(parse, "__name__", "") == "loads":
        return True
    return any(getattr(cell.cell_contents, "__name__", "") == "loads" for cell in getattr(parse, "__closure__", None) or ())


# --- the spot check: milliseconds, in the supervisor --------------------------------------------


def spot_refusal(argv: Sequence[str], settings: Settings, facts: EngineFacts) -> str | None:
    """One sentence naming the setting to fix, for what the recorded facts can tell; None otherwise."""
    sentences = _Sentences(settings, facts)
    words = list(argv)
    unknown: list[str] = []
    ambiguous: list[tuple[str, list[str]]] = []
    given: dict[str, str] = {}  # flag -> the value of its last occurrence
    for index, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, sep, inline = word.partition("=")
        flag = _normalize(name.split(".", 1)[0])  # --speculative-config.method ngram sets one key of the JSON
        resolved = [flag] if flag in facts.flags else [known for known in facts.flags if known.startswith(flag)]
        if not resolved:
            unknown.append(flag)
        elif len(resolved) > 1:
            ambiguous.append((flag, resolved))
        elif "." not in name:
            if sep:
                given[resolved[0]] = inline
            elif index + 1 < len(words) and not words[index + 1].startswith("--"):
                given[resolved[0]] = words[index + 1]
    if unknown:
        return sentences.unknown_flags(unknown)
    if ambiguous:
        flag, matches = ambiguous[0]
        return sentences.ambiguous(flag, matches)
    return sentences.managed() or sentences.values(given)


class _Sentences:
    """The sentences of both checks: who set each flag, and what to write instead."""

    def __init__(self, settings: Settings, facts: EngineFacts) -> None:
        self.settings = settings
        self.facts = facts
        self.engine = f"vLLM {facts.version}"
        self.extra = _extra_flags(settings.VLLM_EXTRA_ARGS)

    def source(self, flag: str) -> str:
        """The variable that put `flag` on the command line."""
        if flag in self.extra:
            return "VLLM_EXTRA_ARGS"
        return SETTING_OF_FLAG.get(flag, "the image's own engine flags")

    def subject(self, flag: str, value: object | None) -> str:
        """`KV_CACHE_DTYPE='fp9' (--kv-cache-dtype)`, or `VLLM_EXTRA_ARGS: --kv-cache-dtype 'fp9'`."""
        source = self.source(flag)
        shown = "" if value is None else repr(value)
        if source != "VLLM_EXTRA_ARGS" and source in type(self.settings).model_fields:
            return f"{source}={shown} ({flag})" if shown else f"{source} ({flag})"
        return f"{source}: {flag} {shown}".rstrip()

    def unknown_flags(self, flags: Sequence[str]) -> str:
        problems = []
        for flag in flags:
            if flag == "--task":
                hint = "removed: set RUNNER=pooling, and CONVERT=embed or classify for a generative model"
            elif matches := difflib.get_close_matches(flag, self.facts.flags, n=1, cutoff=0.75):
                hint = f"did you mean `{matches[0]}`?"
            else:
                hint = None
            problems.append(f"{self.engine} has no flag {flag}" + (f" ({hint})" if hint else ""))
        who = " and ".join(sorted({self.source(flag) for flag in flags}))
        if len(problems) == 1 and problems[0].endswith("?)"):  # the common case reads: did you mean `--x`?
            return f"{who}: " + problems[0][:-1].replace(" (did you mean", ": did you mean")
        return f"{who}: " + "; ".join(problems) + "."

    def ambiguous(self, flag: str, matches: Sequence[str]) -> str:
        return f"{self.source(flag)}: {flag} could be any of {', '.join(matches)} in {self.engine}; write the whole flag."

    def managed(self) -> str | None:
        for flag, setting in MANAGED_FLAGS.items():
            if flag in self.extra:
                fix = f"set {setting} instead" if setting else "the engine stays on 127.0.0.1 behind the wrapper"
                return f"VLLM_EXTRA_ARGS: {flag} is set by the image itself; remove it there ({fix})."
        return None

    def values(self, given: Mapping[str, Any]) -> str | None:
        """The values that the facts can judge: choices, JSON, registered names, speculative config keys."""
        for flag, value in given.items():
            if value is None or value in ("", "None"):
                continue
            if flag in self.facts.choices and str(value) not in self.facts.choices[flag]:
                return f"{self.subject(flag, value)} is not accepted by {self.engine}" + _suggest(
                    str(value), self.facts.choices[flag]
                )
            if flag in self.facts.json_flags and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as error:
                    return self.not_json(flag, value, str(error))
            if sentence := self.name(flag, value, given) or self.speculative(flag, value):
                return sentence
        return None

    def name(self, flag: str, value: object, given: Mapping[str, Any]) -> str | None:
        known = self.facts.names.get(flag)
        name = str(value).lower() if flag == "--load-format" else str(value)  # vLLM lowercases weight formats
        if known is None or given.get(PLUGIN_OF.get(flag, "")) or name in known:
            return None
        return f"{self.subject(flag, value)} is not {NAME_KINDS[flag]} of {self.engine}" + _suggest(str(value), known)

    def speculative(self, flag: str, config: object) -> str | None:
        if flag != "--speculative-config":
            return None
        subject = self.subject(flag, json.dumps(config))
        if not isinstance(config, dict):
            return f"{subject} is not a JSON object: write it like {SPECULATIVE_EXAMPLE}."
        for key in config:
            if key not in self.facts.speculative_keys:
                return f"{subject} has the key {key!r}, unknown to {self.engine}" + _suggest(
                    key, self.facts.speculative_keys, list_all=False
                )
        return None

    def not_json(self, flag: str, value: str, reason: str) -> str:
        example = f", e.g. {SPECULATIVE_EXAMPLE}" if flag == "--speculative-config" else ""
        return f"{self.subject(flag, value)} is not valid JSON ({reason}): write a JSON object{example}."


def _suggest(value: str, known: Sequence[str], list_all: bool = True) -> str:
    """': did you mean `x`?' for a near miss, else the valid names (the end of a sentence)."""
    matches = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    if matches:
        return f": did you mean `{matches[0]}`?"
    if list_all and known:
        return f"; choose one of: {', '.join(known)}."
    return "."


def _normalize(flag: str) -> str:
    """FlexibleArgumentParser takes --max_model_len for --max-model-len."""
    return flag.replace("_", "-") if flag.startswith("--") else flag


def _extra_flags(extra_args: str) -> set[str]:
    try:
        words = shlex.split(extra_args)
    except ValueError:
        words = extra_args.split()
    return {_normalize(word.split("=", 1)[0].split(".", 1)[0]) for word in words if word.startswith("--")}


# --- the full check: vLLM's own parser, in a child process -----------------------------------------


def check_environment(engine_env: Mapping[str, str], source: Mapping[str, str]) -> dict[str, str]:
    """The check's environment: the engine's, plus the settings in `source` that make its command line.

    The engine's environment holds none of the wrapper's settings, but the
    check reads them to build the command line; secrets make no flag and stay out.
    """
    names = set(Settings.model_fields) - SECRET_SETTINGS
    return {**engine_env, **{key: value for key, value in source.items() if key.upper() in names}}


async def check_engine_flags(
    env: Mapping[str, str], timeout_s: float = CHECK_TIMEOUT_S, model: str | None = None
) -> Verdict | None:
    """The full check's verdict, or None when it could not run; runs `python -m app.lifecycle.flag_check` in `env`
    (`check_environment`). With MODELS, `model` names the model whose command line is judged."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.lifecycle.flag_check", *([model] if model is not None else []),
        env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        log.warning("engine flag check timed out; the engine will check its flags itself", extra={"timeout_s": timeout_s})
        return None
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    lines = output.decode("utf-8", "replace").splitlines()
    results = [line[len(RESULT_PREFIX):] for line in lines if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not results:
        log.warning(
            "engine flag check could not run; the engine will check its flags itself",
            extra={"exit_code": process.returncode, "last_lines": lines[-8:]},
        )
        return None
    return Verdict(json.loads(results[-1])["error"])


class _Refused(Exception):
    """argparse's error message, raised instead of printing usage and exiting."""


def engine_parser() -> argparse.ArgumentParser:
    """The pinned vLLM's OpenAI-server parser, raising `_Refused` instead of exiting."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise _Refused(message)

    return make_arg_parser(Parser(prog="vllm serve"))


def refusal(
    argv: Sequence[str], settings: Settings, parser: argparse.ArgumentParser, facts: EngineFacts | None = None
) -> str | None:
    """The full check: one sentence naming the setting to fix when the engine would refuse `argv`."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.renderers.chat_utils import validate_chat_template

    facts = facts or EngineFacts.from_engine(parser)
    if (sentence := spot_refusal(argv, settings, facts)) is not None:
        return sentence
    sentences = _Sentences(settings, facts)
    try:
        args = parser.parse_args(list(argv))
    except _Refused as refused:
        return _describe_parse_error(str(refused), argv, parser, sentences)
    if getattr(args, "model_tag", None) is not None:  # vLLM's unused positional: the word would be ignored
        return (
            f"VLLM_EXTRA_ARGS: the word {args.model_tag!r} belongs to no flag and the engine would ignore it "
            "(a switch such as --enforce-eager takes no value; --no-enforce-eager turns one off)."
        )
    try:
        validate_chat_template(args.chat_template)
    except Exception:  # noqa: BLE001 - FileNotFoundError or vLLM's validation error
        return (
            f"{sentences.subject('--chat-template', args.chat_template)} is neither a file that exists nor a "
            "Jinja template: give the path of a mounted file, or the template text itself."
        )
    try:
        validate_parsed_serve_args(args)
    except Exception as error:  # noqa: BLE001 - vLLM raises TypeError, ValueError and its own validation errors
        message = str(error).removeprefix("Error: ").rstrip(".")
        annotated = re.sub(
            r"--[a-z0-9-]+",
            lambda m: f"{m[0]} ({sentences.source(m[0])})" if m[0] in sentences.extra or m[0] in SETTING_OF_FLAG else m[0],
            message,
        )
        return f"{sentences.engine} refuses the engine settings: {annotated}."
    return None


def _describe_parse_error(
    message: str, argv: Sequence[str], parser: argparse.ArgumentParser, sentences: _Sentences
) -> str:
    match = ARGUMENT_ERROR.match(message)
    if not match:
        return f"{sentences.engine} refuses the engine flags ({message}): check VLLM_EXTRA_ARGS and the engine settings."
    names = match["flags"].split("/")
    flag = next((name for name in names if name.startswith("--")), names[0])
    action = parser._option_string_actions.get(flag)
    value = _value_of(argv, action.option_strings if action else [flag])
    detail = match["detail"]
    if detail == "expected one argument":
        return f"{sentences.subject(flag, None)} needs a value."
    if detail.startswith("ignored explicit argument"):
        return f"{sentences.subject(flag, value)}: {flag} is a switch and takes no value; write {flag} or --no-{flag[2:]}."
    return f"{sentences.subject(flag, value)} is not accepted by {sentences.engine} ({detail.rstrip('.')})."


def _value_of(argv: Sequence[str], flags: Iterable[str]) -> str | None:
    """The value given to the last occurrence of any of `flags` in argv."""
    flags = set(flags)
    value = None
    for index, word in enumerate(argv):
        name, sep, inline = word.partition("=")
        if _normalize(name) in flags:
            if sep:
                value = inline
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                value = argv[index + 1]
    return value


def check_argv(settings: Settings) -> list[str]:
    """The command line to check: the supervisor's, with the flags of every modality (not yet known)."""
    from app.media.modalities import ALL_MODALITIES

    lora_paths = {name: Path(target) for name, target in settings.lora_modules.items()}
    return build_engine_args(settings, settings.MODEL_NAME, ALL_MODALITIES, lora_paths)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m app.lifecycle.flag_check [MODEL]`: the verdict on the engine command line of the settings
    in the environment, or with MODELS, of the model served under the name MODEL."""
    names = sys.argv[1:] if argv is None else list(argv)
    settings = load_settings()
    if names:
        model = settings.catalog.get(names[0]) if settings.catalog is not None else None
        if model is None:
            print(f"MODELS lists no model named {names[0]!r}", file=sys.stderr)
            return 2
        settings = model.settings
    print(RESULT_PREFIX + json.dumps({"error": refusal(check_argv(settings), settings, engine_parser())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
