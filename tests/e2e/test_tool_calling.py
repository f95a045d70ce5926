"""A chat model with a tool-call parser, configured by environment variables only.

SmolLM2-135M-Instruct (converted offline) with TOOL_CALL_PARSER=hermes and
ENABLE_AUTO_TOOL_CHOICE=true, served like `make run` serves it: under its Hub
id, with its folder name as an alias (SERVED_MODEL_NAME="<hub id>,<folder>").
Through the wrapper with the openai SDK: `tool_choice` required and a named
function return tool calls whose arguments match the tool's schema; a
JSON-schema `response_format` returns JSON that validates; the Responses and
Messages APIs answer; client_example.py calls a tool and answers in JSON;
test_api.py checks tool calling.

The stack serves this module only, so it stops when the module ends.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import client_example as ce
from tests.e2e.clients import openai_client, run_client_example, run_test_api, skipped
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER = "smollm2-135m-instruct"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False,
}
TOOLS = [
    ce.function_tool("get_weather", "The weather in a city", WEATHER_SCHEMA),
    ce.function_tool("get_time", "The local time in a city", TIME_SCHEMA),
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir(FOLDER), port=port(31), vllm_port=port(32), log_path=logs_dir / "tools.log",
        extra_env={
            "SERVED_MODEL_NAME": f"{HUB_ID},{FOLDER}", "MAX_MODEL_LEN": "2048",
            "TOOL_CALL_PARSER": "hermes", "ENABLE_AUTO_TOOL_CHOICE": "true",
        },
    )
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def test_tool_choice_required_returns_a_tool_call_matching_its_schema(tools_stack: Stack) -> None:
    reply = openai_client(tools_stack).chat.completions.create(
        model=HUB_ID, messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_function_is_the_one_called(tools_stack: Stack) -> None:
    reply = openai_client(tools_stack).chat.completions.create(
        model=HUB_ID, messages=WEATHER_QUESTION, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=120, temperature=0,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and [call.function.name for call in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME_SCHEMA)


def test_a_json_schema_response_format_returns_json_that_validates(tools_stack: Stack) -> None:
    reply = openai_client(tools_stack).chat.completions.create(
        model=HUB_ID, messages=[{"role": "user", "content": "Invent a person and give their name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        max_tokens=120, temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)


def test_the_responses_api_answers(tools_stack: Stack) -> None:
    reply = openai_client(tools_stack).responses.create(
        model=HUB_ID, input="What is the capital of France?", max_output_tokens=16, temperature=0,
    )
    assert reply.output_text
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 16


def test_the_anthropic_messages_api_answers(tools_stack: Stack) -> None:
    response = httpx.post(
        f"{tools_stack.base_url}/v1/messages", timeout=180,
        json={"model": HUB_ID, "max_tokens": 16, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"][0]["type"] == "text" and body["content"][0]["text"]
    assert body["usage"]["input_tokens"] > 0


def test_the_model_answers_to_its_hub_id_and_its_folder_name(tools_stack: Stack) -> None:
    client = openai_client(tools_stack)
    assert [model.id for model in client.models.list().data] == [HUB_ID, FOLDER]
    reply = client.chat.completions.create(
        model=FOLDER, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
    )
    assert reply.model == HUB_ID  # the reported name is the first one
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


# --- client_example.py and test_api.py ----------------------------------------------------------


def test_client_example_calls_tools_and_answers_in_json(tools_stack: Stack, tmp_path: Path) -> None:
    client = ce.InferenceClient(tools_stack.base_url, max_retries=0)
    assert client.model == HUB_ID
    calls = client.call_tools("What is the weather in Paris?", TOOLS, max_tokens=120, temperature=0)
    assert calls and all(name in SCHEMAS for name, _ in calls)
    named = client.call_tools("What is the weather in Rome?", TOOLS, choice="get_time", max_tokens=120, temperature=0)
    assert [name for name, _ in named] == ["get_time"]
    answer = client.structured("Invent a person.", PERSON_SCHEMA, max_tokens=120, temperature=0)
    jsonschema.validate(answer, PERSON_SCHEMA)

    tool_file = tmp_path / "time.json"
    tool_file.write_text(json.dumps(TOOLS[1]["function"]))
    printed = run_client_example(tools_stack.base_url, "--max-tokens", "120", "--tool", str(tool_file), "Time in Oslo?")
    assert [call["name"] for call in printed] == ["get_time"]
    jsonschema.validate(printed[0]["arguments"], TIME_SCHEMA)


def test_test_api_checks_tool_calling_where_a_parser_is_set(tools_stack: Stack, tmp_path: Path) -> None:
    code, output, rows = run_test_api(tools_stack.base_url, tmp_path)
    assert code == 0, output
    assert rows["tool calling"]["status"] == "pass" and rows["structured output"]["status"] == "pass", output
    assert skipped(rows) == {"image by URL", "image as base64", "video", "embeddings", "rerank", "transcription"}
