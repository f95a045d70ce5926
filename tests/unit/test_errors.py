"""Engine errors reach clients in the OpenAI shape, whatever shape the engine used."""

from __future__ import annotations

import json

from app.errors import openai_error_body


def error_of(status: int, body: bytes) -> dict[str, object]:
    reshaped = openai_error_body(status, body)
    assert reshaped is not None
    answer = json.loads(reshaped)
    assert set(answer) == {"error"}
    return answer["error"]


def test_an_openai_shaped_error_is_kept_as_it_is() -> None:
    body = json.dumps({"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}})
    assert openai_error_body(400, body.encode()) is None


def test_fastapi_detail_sentence_becomes_the_message() -> None:
    error = error_of(404, b'{"detail": "Not Found"}')
    assert error == {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}


def test_fastapi_validation_errors_name_their_fields() -> None:
    detail = [
        {"loc": ["body", 958], "msg": "JSON decode error", "type": "json_invalid"},
        {"loc": [], "msg": "bad", "type": "x"},
    ]
    error = error_of(400, json.dumps({"detail": detail}).encode())
    assert error["message"] == "body.958: JSON decode error; bad"
    assert error["type"] == "invalid_request_error"


def test_plain_text_and_empty_bodies_get_a_message() -> None:
    assert error_of(500, b"Internal Server Error\n")["message"] == "Internal Server Error"
    assert error_of(502, b"")["message"] == "The engine answered HTTP 502."
    assert error_of(400, b"\xff\xfe")["message"] == "\ufffd\ufffd"
    assert error_of(422, b'{"detail": {"field": "x"}}')["message"] == '{"field": "x"}'
