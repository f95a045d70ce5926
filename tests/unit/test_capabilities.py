"""Which endpoints /info says the model serves, and that the rules match the installed vLLM."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from app.capabilities import (
    SUFFIX_DEFAULTS,
    TRANSCRIPTION_ARCHITECTURES,
    TRANSCRIPTION_ONLY_ARCHITECTURES,
    model_capabilities,
)
from app.config import load_settings


def model_dir(tmp_path: Path, config: dict[str, object], **files: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def capabilities(directory: Path | None, **env: str):
    return model_capabilities(load_settings({"MODEL_NAME": "org/model", **env}), directory)


# --- the rules are the installed vLLM's -----------------------------------------------------


def test_runner_defaults_are_the_engines() -> None:
    from vllm.config.model import _SUFFIX_TO_DEFAULTS

    assert list(SUFFIX_DEFAULTS) == [(suffix, tuple(defaults)) for suffix, defaults in _SUFFIX_TO_DEFAULTS]


def test_speech_to_text_architectures_are_the_engines() -> None:
    """The registered architectures whose model class implements SupportsTranscription (read from vLLM's source)."""
    import vllm.model_executor.models as models_package
    from vllm.model_executor.models.registry import _VLLM_MODELS

    bases: dict[str, list[str]] = {}
    transcription_only: set[str] = set()
    for source in Path(models_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases[node.name] = [getattr(base, "id", getattr(base, "attr", "")) for base in node.bases]
            for statement in node.body:
                targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
                value = getattr(statement, "value", None)
                if any(getattr(target, "id", None) == "supports_transcription_only" for target in targets) and (
                    isinstance(value, ast.Constant) and value.value is True
                ):
                    transcription_only.add(node.name)
    speech = {"SupportsTranscription"}
    while grown := {name for name, parents in bases.items() if name not in speech and speech & set(parents)}:
        speech |= grown
    while grown := {name for name, parents in bases.items() if name not in transcription_only and transcription_only & set(parents)}:
        transcription_only |= grown
    registered = {arch: cls for arch, (_, cls) in _VLLM_MODELS.items()}
    assert TRANSCRIPTION_ARCHITECTURES == {arch for arch, cls in registered.items() if cls in speech}
    assert TRANSCRIPTION_ONLY_ARCHITECTURES == {
        arch for arch, cls in registered.items() if cls in speech and cls in transcription_only
    }


# --- what each kind of model serves ------------------------------------------------------------


def test_a_chat_model_serves_generation_with_tools_and_reasoning_as_configured(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    plain = capabilities(directory)
    assert plain.generation and not (plain.embedding or plain.scoring or plain.transcription)
    assert plain.to_json()["tool_calling"] is None and plain.to_json()["reasoning"] is None
    assert "/v1/chat/completions" in plain.endpoints and "/v1/embeddings" not in plain.endpoints

    tools = capabilities(directory, TOOL_CALL_PARSER="hermes", ENABLE_AUTO_TOOL_CHOICE="true", REASONING_PARSER="qwen3")
    assert tools.to_json()["tool_calling"] == {"parser": "hermes", "auto": True}
    assert tools.to_json()["reasoning"] == {"parser": "qwen3"}


def test_a_generative_model_converted_for_embeddings(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    embed = capabilities(directory, RUNNER="pooling", CONVERT="embed", TOOL_CALL_PARSER="hermes")
    assert (embed.runner, embed.pooling_task) == ("pooling", "embed")
    assert embed.embedding and embed.scoring and not embed.generation
    assert embed.to_json()["tool_calling"] is None  # no chat route to call tools on
    assert {"/v1/embeddings", "/pooling", "/v1/score", "/rerank", "/v1/rerank"} <= set(embed.endpoints)
    assert "/v1/chat/completions" not in embed.endpoints
    # CONVERT alone implies the pooling runner, as in vLLM.
    assert capabilities(directory, CONVERT="embed").embedding


def test_an_encoder_embedding_model_needs_no_setting(tmp_path: Path) -> None:
    found = capabilities(model_dir(tmp_path, {"architectures": ["BertModel"]}))
    assert found.embedding and found.scoring and not found.generation


def test_a_sentence_transformers_model_is_pooled_despite_its_causal_architecture(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path, {"architectures": ["Qwen3ForCausalLM"]},
        modules=[{"idx": 0, "type": "sentence_transformers.models.Transformer"},
                 {"idx": 1, "type": "sentence_transformers.models.Pooling"}],
    )
    assert capabilities(directory).embedding


def test_a_cross_encoder_scores_and_reranks_and_a_multi_label_classifier_does_not(tmp_path: Path) -> None:
    cross = capabilities(model_dir(tmp_path / "a", {"architectures": ["BertForSequenceClassification"],
                                                    "id2label": {"0": "LABEL_0"}}))
    assert cross.classification and cross.scoring and not cross.embedding
    assert {"/classify", "/score", "/v1/rerank", "/v2/rerank"} <= set(cross.endpoints)
    labels = capabilities(model_dir(tmp_path / "b", {"architectures": ["BertForSequenceClassification"],
                                                     "id2label": {"0": "NEG", "1": "POS"}}))
    assert labels.classification and not labels.scoring


@pytest.mark.parametrize(
    ("architecture", "chat"),
    [("WhisperForConditionalGeneration", False), ("VoxtralForConditionalGeneration", True)],
)
def test_speech_to_text_models_serve_the_audio_routes(tmp_path: Path, architecture: str, chat: bool) -> None:
    found = capabilities(model_dir(tmp_path, {"architectures": [architecture]}))
    assert found.transcription
    assert found.generation is chat
    assert {"/v1/audio/transcriptions", "/v1/audio/translations"} <= set(found.endpoints)


def test_an_unknown_model_directory_reports_what_the_settings_say() -> None:
    remote = capabilities(None)
    assert remote.architecture is None and remote.generation
    assert capabilities(None, RUNNER="pooling").embedding

