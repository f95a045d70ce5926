"""What kinds of input the served model takes: text, images, video, audio.

The wrapper refuses an image sent to a text-only model with a clear 400
before the engine sees it; the engine's own answer is an opaque error. The
model directory tells: a vision tower in config.json (`vision_config`, image
token ids) or an image processor means images; video token ids, a video
processor or a known video-capable family (Qwen2-VL, Qwen2.5-VL, ...) means
video; an audio tower (`audio_config`, audio token ids) or an audio feature
extractor (one with a `sampling_rate`, like Whisper's) means audio. Only the
small JSON files are read, never weights.

When the directory is unknown (a remote engine behind ENGINE_URL) or carries
no config the wrapper can read, every modality is reported and the
IMAGE_LIMIT / VIDEO_LIMIT settings alone decide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT_ONLY = frozenset({"text"})
ALL_MODALITIES = frozenset({"text", "image", "video", "audio"})

IMAGE_CONFIG_KEYS = frozenset({"vision_config", "image_token_id", "image_token_index", "mm_vision_tower"})
VIDEO_CONFIG_KEYS = frozenset({"video_token_id", "video_token_index"})
AUDIO_CONFIG_KEYS = frozenset({"audio_config", "audio_token_id", "audio_token_index"})

# Families whose processors take video although their config.json may not say so.
VIDEO_MODEL_TYPES = frozenset(
    {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        "qwen2_5_omni",
        "qwen3_omni_moe",
        "llava_onevision",
        "llava_next_video",
        "video_llava",
        "glm4v",
        "glm4v_moe",
        "internvl",
    }
)


def detect_modalities(model_dir: Path | None) -> frozenset[str]:
    """The modalities of the model in `model_dir`; all of them when it cannot tell."""
    if model_dir is None:
        return ALL_MODALITIES
    config = _read_json(model_dir / "config.json")
    mistral_params = _read_json(model_dir / "params.json")
    if config is None and mistral_params is None:
        return ALL_MODALITIES

    config_keys = _keys_one_level_deep(config or {})
    processor = _read_json(model_dir / "processor_config.json") or {}
    preprocessor = _read_json(model_dir / "preprocessor_config.json") or {}

    image = (
        bool(config_keys & IMAGE_CONFIG_KEYS)
        or "image_processor" in processor
        or "image_processor_type" in preprocessor
        or "image_mean" in preprocessor
        or "vision_encoder" in (mistral_params or {})
    )
    video = (
        bool(config_keys & VIDEO_CONFIG_KEYS)
        or "video_processor" in processor
        or (model_dir / "video_preprocessor_config.json").is_file()
        or (config or {}).get("model_type") in VIDEO_MODEL_TYPES
    )
    audio = (
        bool(config_keys & AUDIO_CONFIG_KEYS)
        or "sampling_rate" in (processor.get("feature_extractor") or {})
        or "sampling_rate" in preprocessor
    )
    modalities = {"text"}
    if image:
        modalities.add("image")
    if video:
        modalities.add("video")
    if audio:
        modalities.add("audio")
    return frozenset(modalities)


def _keys_one_level_deep(config: dict[str, Any]) -> set[str]:
    """Top-level keys plus those of nested sections (e.g. Qwen2.5-Omni's `thinker_config`)."""
    keys = set(config)
    for value in config.values():
        if isinstance(value, dict):
            keys.update(value)
    return keys


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
