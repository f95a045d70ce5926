"""Which replies `/generate` reports as JSON (`response_json`, `response_is_json`)."""

from __future__ import annotations

import pytest

from app.generate.json_reply import parse_json_reply


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ('{"city": "Paris", "population": 2102650}', {"city": "Paris", "population": 2102650}),
        ('  [1, 2, {"a": null}]\n', [1, 2, {"a": None}]),
        ('```json\n{"ok": true}\n```', {"ok": True}),
        ('```JSON\n[\n  "x"\n]\n```\n', ["x"]),
        ('```\n{"plain": "fence"}\n```', {"plain": "fence"}),
    ],
)
def test_json_objects_and_arrays_are_parsed(reply: str, value: object) -> None:
    assert parse_json_reply(reply) == (True, value)


@pytest.mark.parametrize(
    "reply",
    [
        "The capital of France is Paris.",
        "42",
        '"just a string"',
        '{"unterminated": ',
        'Here you go: {"a": 1}',
        '```python\nprint("hi")\n```',
        '{"value": NaN}',
        "",
    ],
)
def test_text_scalars_and_broken_json_are_not_json(reply: str) -> None:
    assert parse_json_reply(reply) == (False, None)
