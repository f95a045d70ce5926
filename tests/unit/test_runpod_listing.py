"""The RunPod Hub listing and templates: valid for RunPod, and generated from app/config.py.

RunPod's own validation only runs when a release is published, so the Hub's
documented format (https://docs.runpod.io/hub/publishing-guide: the hub.json and
tests.json references) is written down here as JSON schemas, and every schema is
first shown broken listings it must refuse. The drift tests render the listing
from a modified `Settings`, so they prove that a changed description, default or
new setting shows in the committed files only after `python tools/settings_docs.py`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import Field, create_model

from app.config import Settings, load_settings
from app.lifecycle.engine_args import build_engine_args
from tools import runpod_listing as listing
from tools.settings_docs import default_text

ROOT = Path(__file__).resolve().parents[2]
# GPU pool ids of https://docs.runpod.io/references/gpu-types#gpu-pools, for `gpuIds`.
GPU_POOLS = {"AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"}

SCALAR = {"type": ["string", "number", "boolean"]}
HUB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "description", "type", "category", "config"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "type": {"const": "serverless"},
        "category": {"enum": ["audio", "embedding", "language", "video", "image"]},
        "iconUrl": {"type": "string", "pattern": "^https://"},
        "config": {
            "type": "object",
            "required": ["runsOn", "containerDiskInGb"],
            "additionalProperties": False,
            "properties": {
                "runsOn": {"enum": ["GPU", "CPU"]},
                "endpointType": {"const": "LB"},
                "containerDiskInGb": {"type": "integer", "minimum": 1},
                "cpuFlavor": {"type": "string"},
                "gpuCount": {"type": "integer", "minimum": 1},
                "gpuIds": {"type": "string", "minLength": 1},
                "allowedCudaVersions": {"type": "array", "items": {"type": "string", "pattern": r"^\d+\.\d+$"}},
                "env": {"type": "array", "items": {"$ref": "#/$defs/env"}},
                "presets": {"type": "array", "items": {"$ref": "#/$defs/preset"}},
            },
            "allOf": [
                {"if": {"properties": {"runsOn": {"const": "GPU"}}}, "then": {"required": ["gpuCount", "gpuIds"]}},
                {"if": {"properties": {"runsOn": {"const": "CPU"}}}, "then": {"required": ["cpuFlavor"]}},
            ],
        },
    },
    "$defs": {
        "env": {
            "type": "object",
            "required": ["key"],
            "additionalProperties": False,
            "properties": {
                "key": {"type": "string", "pattern": "^[A-Z_][A-Z0-9_]*$"},
                "value": {"type": "string"},
                "input": {"$ref": "#/$defs/input"},
            },
            "oneOf": [{"required": ["value"]}, {"required": ["input"]}],
        },
        "input": {
            "type": "object",
            "required": ["name", "type", "description"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "type": {"enum": ["string", "number", "boolean", "huggingface"]},
                "description": {"type": "string", "minLength": 1},
                "default": SCALAR,
                "required": {"type": "boolean"},
                "advanced": {"type": "boolean"},
                "options": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["label", "value"],
                        "additionalProperties": False,
                        "properties": {"label": {"type": "string"}, "value": {"type": "string"}},
                    },
                },
                "min": {"type": "number"},
                "max": {"type": "number"},
                "trueValue": {"type": "string"},
                "falseValue": {"type": "string"},
            },
            "allOf": [
                {
                    "if": {"properties": {"type": {"const": "number"}}},
                    "then": {"properties": {"default": {"type": "number"}}},
                    "else": {"not": {"anyOf": [{"required": ["min"]}, {"required": ["max"]}]}},
                },
                {
                    "if": {"properties": {"type": {"const": "boolean"}}},
                    "then": {"properties": {"default": {"type": "boolean"}}, "required": ["trueValue", "falseValue"]},
                    "else": {"not": {"anyOf": [{"required": ["trueValue"]}, {"required": ["falseValue"]}]}},
                },
                {
                    "if": {"properties": {"type": {"enum": ["string", "huggingface"]}}},
                    "then": {"properties": {"default": {"type": "string"}}},
                    "else": {"not": {"required": ["options"]}},
                },
            ],
        },
        "preset": {
            "type": "object",
            "required": ["name", "defaults"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "defaults": {"type": "object", "minProperties": 1, "additionalProperties": SCALAR},
            },
        },
    },
}
TESTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["tests", "config"],
    "additionalProperties": False,
    "properties": {
        "tests": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "input"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "input": {"type": "object"},
                    "timeout": {"type": "integer", "minimum": 1},
                },
            },
        },
        "config": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "gpuTypeId": {"type": "string", "minLength": 1},
                "gpuCount": {"type": "integer", "minimum": 1},
                "cpuFlavor": {"type": "string"},
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "value"],
                        "additionalProperties": False,
                        "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                    },
                },
                "allowedCudaVersions": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


def committed(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def hub_inputs(hub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry["input"] for entry in hub["config"]["env"] if "input" in entry}


def hub_statics(hub: dict[str, Any]) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in hub["config"]["env"] if "value" in entry}


# --- the Hub's format ----------------------------------------------------------------------------


def test_hub_json_has_every_field_the_hub_requires() -> None:
    hub = committed(listing.HUB_JSON)
    jsonschema.validate(hub, HUB_SCHEMA)
    config = hub["config"]
    assert config["endpointType"] == "LB", "users deploy it as a load-balancing endpoint or a pod"
    assert set(config["gpuIds"].split(",")) <= GPU_POOLS
    keys = [entry["key"] for entry in config["env"]]
    assert len(keys) == len(set(keys)), "one entry per variable"


def test_tests_json_has_every_field_the_hub_requires() -> None:
    tests = committed(listing.TESTS_JSON)
    jsonschema.validate(tests, TESTS_SCHEMA)
    config = tests["config"]
    # The listing runs on GPUs, so its test does too.
    assert config["gpuTypeId"] and config["gpuCount"] >= 1
    assert config["allowedCudaVersions"] == committed(listing.HUB_JSON)["config"]["allowedCudaVersions"]
    load_settings({entry["key"]: entry["value"] for entry in config["env"]})


@pytest.mark.parametrize(
    "breakage",
    [
        lambda hub: hub.pop("config"),
        lambda hub: hub.update(category="llm"),
        lambda hub: hub["config"].update(endpointType="lb"),
        lambda hub: hub["config"].pop("gpuIds"),
        lambda hub: hub["config"].update(containerDiskInGb="60"),
        lambda hub: hub["config"]["env"].append({"key": "X", "value": "1", "input": {"name": "X", "type": "string"}}),
        lambda hub: hub["config"]["env"][1]["input"].update(type="text"),
        lambda hub: hub["config"]["env"][1]["input"].update(defualt="x"),
        lambda hub: hub["config"]["presets"][0].update(defaults={}),
    ],
)
def test_the_hub_schema_refuses_broken_listings(breakage: Any) -> None:
    hub = copy.deepcopy(committed(listing.HUB_JSON))
    breakage(hub)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(hub, HUB_SCHEMA)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda tests: tests.update(tests=[]),
        lambda tests: tests["tests"][0].pop("input"),
        lambda tests: tests["tests"][0].update(timeout="10m"),
        lambda tests: tests["config"]["env"].append({"key": "PORT", "value": 80}),
    ],
)
def test_the_tests_schema_refuses_broken_tests(breakage: Any) -> None:
    tests = copy.deepcopy(committed(listing.TESTS_JSON))
    breakage(tests)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tests, TESTS_SCHEMA)


def test_the_repository_has_every_file_the_hub_builds_from() -> None:
    # "handler.py, Dockerfile and README.md, in either the .runpod or the root directory".
    for name in ("handler.py", "Dockerfile", "README.md"):
        assert (ROOT / ".runpod" / name).is_file() or (ROOT / name).is_file(), name


def test_the_hub_handler_starts_the_image_server() -> None:
    """The handler hands over to scripts/start.sh: a bad setting fails there, named, before any download."""
    result = subprocess.run(
        [sys.executable, str(ROOT / ".runpod" / "handler.py")],
        env={**os.environ, "MAX_LORAS": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "Invalid setting MAX_LORAS='0'" in result.stderr


# --- generated from the settings ------------------------------------------------------------------


def test_committed_files_are_what_the_settings_render() -> None:
    for path, text in listing.rendered_files().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python tools/settings_docs.py"


def test_every_input_has_the_description_and_default_of_its_setting() -> None:
    inputs = hub_inputs(committed(listing.HUB_JSON))
    assert set(inputs) == set(listing.FORM)
    for name, entry in inputs.items():
        field = Settings.model_fields[name]
        assert entry["description"].startswith(field.description), name
        assert listing.env_text(entry.get("default", "")) == default_text(name), name


def test_option_inputs_offer_exactly_the_values_the_setting_accepts() -> None:
    for name, entry in hub_inputs(committed(listing.HUB_JSON)).items():
        for option in entry.get("options", []):
            load_settings({name: option["value"]})
        if entry["type"] == "boolean":
            assert load_settings({name: entry["trueValue"]}).model_dump()[name] is True
            assert load_settings({name: entry["falseValue"]}).model_dump()[name] is False


def _modified_settings(**fields: Any) -> type[Settings]:
    return create_model("ModifiedSettings", __base__=Settings, **fields)


def test_a_changed_description_or_default_leaves_the_committed_files_stale() -> None:
    changed = _modified_settings(
        MAX_MODEL_LEN=(int | None, Field(None, ge=16, description="Context window, changed in app/config.py.")),
        GPU_MEMORY_UTIL=(float, Field(0.8, gt=0.0, le=1.0, description="Fraction of GPU memory the engine may use.")),
    )
    rendered = listing.rendered_files(changed)
    stale = {path for path, text in rendered.items() if path.read_text() != text}
    # The form shows both; the templates carry the basic inputs' defaults.
    assert stale == {listing.HUB_JSON, listing.POD_TEMPLATE, listing.SERVERLESS_TEMPLATE}
    inputs = hub_inputs(json.loads(rendered[listing.HUB_JSON]))
    assert inputs["MAX_MODEL_LEN"]["description"] == "Context window, changed in app/config.py."
    assert inputs["GPU_MEMORY_UTIL"]["default"] == 0.8
    assert json.loads(rendered[listing.POD_TEMPLATE])["env"]["GPU_MEMORY_UTIL"] == "0.8"


def test_a_new_setting_must_be_put_on_the_form_or_left_off_it() -> None:
    added = _modified_settings(NEW_ENGINE_SETTING=(str | None, Field(None, description="A new setting.")))
    with pytest.raises(listing.ListingError, match="NEW_ENGINE_SETTING: put each in FORM .* or in OFF_FORM"):
        listing.rendered_files(added)


# --- presets and templates -------------------------------------------------------------------------


def test_presets_are_valid_settings_within_the_form_bounds() -> None:
    hub = committed(listing.HUB_JSON)
    inputs = hub_inputs(hub)
    for preset in hub["config"]["presets"]:
        for name, value in preset["defaults"].items():
            entry = inputs[name]
            if entry["type"] == "number":
                assert isinstance(value, (int, float)) and entry.get("min", value) <= value <= entry.get("max", value)
            if "options" in entry:
                assert value in {option["value"] for option in entry["options"]}
        env = {**hub_statics(hub), **{name: listing.env_text(value) for name, value in preset["defaults"].items()}}
        load_settings(env)


def test_the_embedding_preset_starts_the_engine_with_the_pooling_runner() -> None:
    settings = load_settings({name: listing.env_text(value) for name, value in listing.EMBEDDING.values.items()})
    args = build_engine_args(settings, "/models/embedding", frozenset({"text"}))
    assert args[args.index("--runner") + 1] == "pooling"
    assert args[args.index("--convert") + 1] == "embed"


def test_templates_deploy_the_listing_vision_preset_with_the_form_defaults() -> None:
    hub = committed(listing.HUB_JSON)
    inputs = hub_inputs(hub)
    vision = next(p["defaults"] for p in hub["config"]["presets"] if p["name"] == listing.VISION.name)
    for template_path in (listing.POD_TEMPLATE, listing.SERVERLESS_TEMPLATE):
        template = committed(template_path)
        env = template["env"]
        load_settings(env)
        for name, value in env.items():
            if name in vision:
                assert value == listing.env_text(vision[name]), (template_path.name, name)
            elif name in inputs:
                assert value == listing.env_text(inputs[name]["default"]), (template_path.name, name)
        assert f"{env['PORT']}/http" in template["ports"]
        assert not {"HF_TOKEN", "API_KEY", "CONVERSATIONS_DB_URL"} & set(env), "secrets belong in RunPod secrets"
    serverless = committed(listing.SERVERLESS_TEMPLATE)["env"]
    assert float(serverless["REQUEST_TIMEOUT_S"]) < 330, "RunPod ends a load-balancing request after 5.5 min"
