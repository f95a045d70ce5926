"""Spotting replies that are JSON.

Clients that ask the model for structured output want the parsed value, not a
string to parse again, and instruct-tuned models often wrap JSON in a
Markdown ```json fence. Only objects and arrays count: a reply such as `42`
or `true` is an answer in words, not structured output.
"""

from __future__ import annotations

import json
import re

from pydantic import JsonValue

_FENCED = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(?P<body>.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON, and a reply holding them could not be sent back as JSON.
    raise ValueError(f"{name} is not valid JSON")


def parse_json_reply(text: str) -> tuple[bool, JsonValue]:
    """Return (True, value) when the reply is a JSON object or array, else (False, None)."""
    candidate = text.strip()
    fenced = _FENCED.match(candidate)
    if fenced:
        candidate = fenced.group("body").strip()
    if not candidate.startswith(("{", "[")):
        return False, None
    try:
        value = json.loads(candidate, parse_constant=_reject_constant)
    except ValueError:
        return False, None
    return True, value
