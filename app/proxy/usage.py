"""Token accounting on relayed streams without changing what the client sees.

The wrapper logs and counts tokens for every request, and for streams the only
exact source is the engine's usage block. When a client did not ask for it
(`stream_options.include_usage`), the proxy asks on its behalf and this filter
takes that extra event back out of the byte stream before relaying, so the
client receives exactly the stream it asked for.

Per chunk this costs a suffix test and a substring search; events are only
split and parsed in a chunk that mentions `"usage"` (the one with the usage
block, or each chunk with per-chunk usage when the client asked for it).
"""

from __future__ import annotations

import json

USAGE_KEY = b'"usage"'
EVENT_END = b"\n\n"


class UsageFilter:
    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Returns the complete events to relay now; a trailing partial event waits for its end."""
        if self._held:
            chunk, self._held = self._held + chunk, b""
        if not chunk.endswith(EVENT_END):
            boundary = chunk.rfind(EVENT_END)
            cut = 0 if boundary < 0 else boundary + len(EVENT_END)
            chunk, self._held = chunk[:cut], chunk[cut:]
        start = chunk.find(USAGE_KEY)
        if start < 0:
            return chunk
        kept: list[bytes] = []
        for event in chunk.split(EVENT_END)[:-1]:
            usage_event = USAGE_KEY in event and self._read_usage(event)
            if not (usage_event and self.strip):
                kept.append(event + EVENT_END)
        return b"".join(kept)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _read_usage(self, event: bytes) -> bool:
        """Read the token counts of an event that carries a usage block; False when it has none."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                usage = json.loads(line[5:]).get("usage")
            except (ValueError, AttributeError):
                return False
            if not isinstance(usage, dict):
                return False
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
            return True
        return False


def read_json_usage(body: bytes) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of a non-streaming JSON reply."""
    if USAGE_KEY not in body:
        return None, None
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return None, None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")
