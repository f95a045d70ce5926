"""`.env.example`, the README's settings table and app/config.py agree."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings
from tools.settings_docs import default_text

ROOT = Path(__file__).resolve().parents[2]


def env_example_settings() -> dict[str, str]:
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def readme_table_settings() -> dict[str, str]:
    found = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([A-Z][A-Z0-9_]+)` \| (?:`([^`]*)`|—) \|", line)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


def test_env_example_lists_every_setting_with_its_default() -> None:
    expected = {name: default_text(name) for name in Settings.model_fields}
    assert env_example_settings() == expected


def test_readme_table_lists_every_setting_with_its_default() -> None:
    expected = {name: default_text(name) for name in Settings.model_fields}
    assert readme_table_settings() == expected


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not missing
