"""What the wrapper learns about one request.

The proxy fills one `RequestRecord` while it serves a request; observability
turns it into metrics and exactly one summary log line when the request ends.
Keeping it a plain dataclass keeps the hot path free of logging and metrics
calls until the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    route: str
    client: str | None
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    stream: bool = False
    first_token_at: float | None = None
    finished: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    text_parts: int = 0
    images: int = 0
    videos: int = 0
    queue_wait_s: float = 0.0
    load_wait_s: float | None = None  # with MODELS: the wait for the model's engine (0 when it was loaded)
    error_cause: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or self.finished is None:
            return None
        return self.completion_tokens / self.duration_s
