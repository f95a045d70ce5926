"""Which inputs a model directory says the model takes."""

from __future__ import annotations

import json
from pathlib import Path

from app.media.modalities import detect_modalities


def model_dir(tmp_path: Path, **files: dict[str, object]) -> Path:
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128}


def test_text_only_model(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, config=LLAMA_CONFIG, generation_config={"eos_token_id": 2})
    assert detect_modalities(directory) == {"text"}


def test_whisper_style_audio_preprocessor_means_audio_not_images(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]},
        preprocessor_config={"feature_extractor_type": "WhisperFeatureExtractor", "sampling_rate": 16000},
    )
    assert detect_modalities(directory) == {"text", "audio"}


def test_whisper_as_written_by_transformers_5(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]},
        processor_config={
            "processor_class": "WhisperProcessor",
            "feature_extractor": {"feature_extractor_type": "WhisperFeatureExtractor", "sampling_rate": 16000},
        },
    )
    assert detect_modalities(directory) == {"text", "audio"}


def test_an_audio_tower_in_the_config_means_audio(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, config={"model_type": "qwen2_audio", "audio_config": {"d_model": 64}})
    assert detect_modalities(directory) == {"text", "audio"}


def test_qwen2_vl_as_written_by_transformers_5(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={
            "model_type": "qwen2_vl",
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_config": {"depth": 2},
            "text_config": {"hidden_size": 64},
        },
        processor_config={
            "processor_class": "Qwen2VLProcessor",
            "image_processor": {"image_processor_type": "Qwen2VLImageProcessor"},
            "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor"},
        },
    )
    assert detect_modalities(directory) == {"text", "image", "video"}


def test_older_qwen2_5_vl_layout_with_only_a_preprocessor(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={"model_type": "qwen2_5_vl", "vision_config": {"depth": 32}},
        preprocessor_config={"image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5, 0.5, 0.5]},
    )
    assert detect_modalities(directory) == {"text", "image", "video"}


def test_image_only_vision_model(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={
            "model_type": "llava",
            "image_token_index": 32000,
            "vision_config": {"model_type": "clip_vision_model"},
        },
        preprocessor_config={"image_processor_type": "CLIPImageProcessor", "image_mean": [0.48, 0.46, 0.41]},
    )
    assert detect_modalities(directory) == {"text", "image"}


def test_separate_video_preprocessor_file_means_video(tmp_path: Path) -> None:
    directory = model_dir(
        tmp_path,
        config={"model_type": "some_new_vl", "vision_config": {}},
        video_preprocessor_config={"video_processor_type": "SomeVideoProcessor"},
    )
    assert detect_modalities(directory) == {"text", "image", "video"}


def test_nested_vision_section(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, config={"model_type": "omni_like", "thinker_config": {"vision_config": {}}})
    assert "image" in detect_modalities(directory)


def test_mistral_format_with_vision_encoder(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, params={"dim": 5120, "vision_encoder": {"image_size": 1024}})
    assert detect_modalities(directory) == {"text", "image"}


def test_unknown_model_trusts_the_limits(tmp_path: Path) -> None:
    everything = {"text", "image", "video", "audio"}
    assert detect_modalities(None) == everything
    assert detect_modalities(tmp_path) == everything  # no config to read
    (tmp_path / "config.json").write_text("{not json")
    assert detect_modalities(tmp_path) == everything
