"""Startup failures as one sentence that names the fix.

placeholder: classifier follows
"""

from __future__ import annotations


class StartupError(Exception):
    """A fatal startup problem; str(error) is one sentence that says what to change."""
