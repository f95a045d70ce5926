"""Request bodies parse the same with msgspec as with the standard library, including what msgspec refuses."""

from __future__ import annotations

import json
import math

import pytest

from app import json_codec
from app.errors import APIError
from app.proxy.relay import parse_json_object


def test_a_chat_body_parses_as_json_would() -> None:
    body = '{"model":"m","messages":[{"role":"user","content":"héllo \\u2028"}],"max_tokens":16,"temperature":0.7}'
    assert json_codec.loads(body.encode()) == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"temperature": NaN, "top_p": Infinity}',  # not JSON, but json and the engine take them
        b'{"content": "\\ud800 alone"}',  # a lone surrogate escape
        b'{"max_tokens": 1e400}',  # too large for a float: json reads inf
    ],
)
def test_what_msgspec_refuses_is_parsed_by_json(body: bytes) -> None:
    parsed = json_codec.loads(body)
    expected = json.loads(body)
    if "temperature" in expected:
        assert math.isnan(parsed["temperature"]) and parsed["top_p"] == math.inf
    else:
        assert parsed == expected


def test_integers_of_any_size_stay_exact() -> None:
    """A seed beyond 64 bits reaches the engine as the client wrote it, not as a float."""
    assert json_codec.loads(b'{"seed": 123456789012345678901234567890}') == {"seed": 123456789012345678901234567890}


def test_a_body_nested_too_deeply_is_a_400() -> None:
    with pytest.raises(APIError) as raised:
        parse_json_object(b"[" * 5000 + b"]" * 5000)
    assert raised.value.status == 400 and "nested too deeply" in raised.value.message


@pytest.mark.parametrize("body", [b"{", b'{"a": 1,}', b"\xff\xfe{}", b""])
def test_what_neither_parses_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        json_codec.loads(body)


def test_a_body_that_is_not_json_is_a_400_naming_the_problem() -> None:
    with pytest.raises(APIError) as raised:
        parse_json_object(b'{"model": "m",')
    assert raised.value.status == 400 and "not valid JSON" in raised.value.message
