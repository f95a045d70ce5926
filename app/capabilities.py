"""Which endpoints the served model answers, worked out from the settings and its config.json.

vLLM registers its routes by what the model can do: chat and completions for
a generative model, `/v1/embeddings` for an embedding model, score and rerank
for embedding models and single-label classifiers (cross-encoders),
`/classify` for classifiers, the audio routes for speech-to-text models. It
decides from RUNNER and CONVERT or, when they are `auto`, from the
architecture named in config.json. `/info` reports the result so a client (and
`test_api.py`) knows what to call; tool calling and reasoning are reported as
configured (TOOL_CALL_PARSER, ENABLE_AUTO_TOOL_CHOICE, REASONING_PARSER).

This mirrors the pinned vLLM's rules (`_SUFFIX_TO_DEFAULTS` in
vllm/config/model.py, `enable_scoring_api` in vllm/entrypoints/pooling/utils.py,
the models that implement `SupportsTranscription`) without importing vLLM,
which the wrapper processes must not do; `tests/unit/test_capabilities.py`
checks the tables against the installed vLLM, so an upgrade that changes them
fails a test instead of /info.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings

# Architecture-name suffix -> (runner, convert) when RUNNER/CONVERT are auto; the first match wins.
SUFFIX_DEFAULTS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("ForCausalLM", ("generate", "none")),
    ("ForConditionalGeneration", ("generate", "none")),
    ("ChatModel", ("generate", "none")),
    ("LMHeadModel", ("generate", "none")),
    ("ForTextEncoding", ("pooling", "embed")),
    ("EmbeddingModel", ("pooling", "embed")),
    ("ForSequenceClassification", ("pooling", "classify")),
    ("ForTokenClassification", ("pooling", "classify")),
    ("ForAudioClassification", ("pooling", "classify")),
    ("ForImageClassification", ("pooling", "classify")),
    ("ForVideoClassification", ("pooling", "classify")),
    ("ClassificationModel", ("pooling", "classify")),
    ("ForRewardModeling", ("pooling", "embed")),
    ("RewardModel", ("pooling", "embed")),
    ("Model", ("pooling", "embed")),
)
# Speech-to-text architectures of the pinned vLLM, and those that serve nothing but transcription.
TRANSCRIPTION_ARCHITECTURES = frozenset({
    "ClefOmniForJointSchema", "CohereAsrForConditionalGeneration", "FireRedASR2ForConditionalGeneration",
    "FunASRForConditionalGeneration", "Gemma3nForConditionalGeneration", "GlmAsrForConditionalGeneration",
    "GraniteSpeechForConditionalGeneration", "GraniteSpeechPlusForConditionalGeneration", "MoonshotKimiaForCausalLM",
    "MossTranscribeDiarizeForConditionalGeneration", "Qwen3ASRForConditionalGeneration",
    "Qwen3ASRForcedAlignerForTokenClassification", "Qwen3ASRRealtimeGeneration", "Qwen3OmniMoeForConditionalGeneration",
    "VoxtralForConditionalGeneration", "VoxtralRealtimeGeneration", "WhisperForConditionalGeneration",
})
TRANSCRIPTION_ONLY_ARCHITECTURES = frozenset({
    "CohereAsrForConditionalGeneration", "FireRedASR2ForConditionalGeneration", "FunASRForConditionalGeneration",
    "MossTranscribeDiarizeForConditionalGeneration", "WhisperForConditionalGeneration",
})

ALWAYS_ROUTES = ("/v1/models", "/tokenize", "/detokenize")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
EMBEDDING_ROUTES = ("/v1/embeddings", "/pooling")
CLASSIFICATION_ROUTES = ("/classify", "/pooling")
SCORING_ROUTES = ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank")
TRANSCRIPTION_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")


@dataclass(frozen=True)
class Capabilities:
    architecture: str | None  # None when the model directory is unknown (ENGINE_URL)
    runner: str  # generate or pooling
    pooling_task: str | None  # embed or classify for the pooling runner
    generation: bool
    embedding: bool
    classification: bool
    scoring: bool  # score and rerank: embedding models and single-label classifiers
    transcription: bool
    tool_call_parser: str | None  # tool_choice required / named work when set
    auto_tool_choice: bool  # tool_choice auto
    reasoning_parser: str | None

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The engine routes that answer for this model, in a stable order."""
        routes = list(ALWAYS_ROUTES)
        for enabled, group in (
            (self.generation, GENERATION_ROUTES),
            (self.embedding, EMBEDDING_ROUTES),
            (self.classification, CLASSIFICATION_ROUTES),
            (self.scoring, SCORING_ROUTES),
            (self.transcription, TRANSCRIPTION_ROUTES),
        ):
            if enabled:
                routes += group
        return tuple(dict.fromkeys(routes))

    def to_json(self) -> dict[str, Any]:
        """What /info shows under `capabilities`."""
        return {
            "architecture": self.architecture,
            "runner": self.runner,
            "pooling_task": self.pooling_task,
            "generation": self.generation,
            "embedding": self.embedding,
            "classification": self.classification,
            "scoring": self.scoring,
            "transcription": self.transcription,
            "structured_output": self.generation,
            "tool_calling": {"parser": self.tool_call_parser, "auto": self.auto_tool_choice}
            if self.tool_call_parser else None,
            "reasoning": {"parser": self.reasoning_parser} if self.reasoning_parser else None,
            "endpoints": list(self.endpoints),
        }


def model_capabilities(settings: Settings, model_dir: Path | None) -> Capabilities:
    """What the model in `model_dir` serves with these settings; from the settings alone when it is None."""
    config = _read_json(model_dir / "config.json") if model_dir else None
    architectures = [str(name) for name in (config or {}).get("architectures") or []]
    architecture = architectures[0] if architectures else None
    runner, task = _runner_and_task(settings, architecture, model_dir)
    transcription = architecture in TRANSCRIPTION_ARCHITECTURES and runner == "generate"
    generation = runner == "generate" and architecture not in TRANSCRIPTION_ONLY_ARCHITECTURES
    embedding = task == "embed"
    classification = task == "classify"
    return Capabilities(
        architecture=architecture,
        runner=runner,
        pooling_task=task,
        generation=generation,
        embedding=embedding,
        classification=classification,
        scoring=embedding or (classification and _num_labels(config or {}) == 1),
        transcription=transcription,
        tool_call_parser=settings.TOOL_CALL_PARSER if generation else None,
        auto_tool_choice=generation and settings.ENABLE_AUTO_TOOL_CHOICE,
        reasoning_parser=settings.REASONING_PARSER if generation else None,
    )


def _runner_and_task(settings: Settings, architecture: str | None, model_dir: Path | None) -> tuple[str, str | None]:
    """vLLM's runner, and for the pooling runner its task (embed or classify)."""
    runner = settings.RUNNER
    if runner == "auto":
        if settings.CONVERT not in ("auto", "none") or (model_dir and _is_sentence_transformer(model_dir)):
            runner = "pooling"
        else:
            runner = _suffix_default(architecture, None)[0] if architecture else "generate"
    if runner != "pooling":
        return runner, None
    if settings.CONVERT in ("embed", "classify"):
        return runner, settings.CONVERT
    task = _suffix_default(architecture, "pooling")[1] if architecture else "embed"
    return runner, task if task in ("embed", "classify") else "embed"


def _suffix_default(architecture: str, runner: str | None) -> tuple[str, str]:
    for suffix, (default_runner, default_convert) in SUFFIX_DEFAULTS:
        if (runner is None or runner == default_runner) and architecture.endswith(suffix):
            return default_runner, default_convert
    return (runner or "generate"), ("embed" if runner == "pooling" else "none")


def _is_sentence_transformer(model_dir: Path) -> bool:
    """A Sentence Transformers model (a Pooling module in modules.json) is pooled even with a *ForCausalLM."""
    modules = _read_json_list(model_dir / "modules.json")
    return any("Pooling" in str(module.get("type", "")) for module in modules if isinstance(module, dict))


def _num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"]
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) else 2  # transformers' default


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []
