"""What the wrapper's HTTP server tells the application about a request beyond ASGI.

ASGI says two things only through `receive()`: that the client hung up
(`http.disconnect`) and whether the body has fully arrived. Learning the
first while a response is being relayed takes a task per request waiting on
`receive()`; bounding the second takes a timer per request around reading a
body that, for almost every request, arrived with its headers. The wrapper's
protocol (`app.serve.GuardedHttpProtocol`) knows both as they happen, so it
puts a `RequestProgress` in each request's scope (`scope["extensions"]`) and
keeps it current: the relay registers a callback for a disconnect instead of
a watcher task, and the front door reads a complete body without a deadline.

Under another server the extension is absent and the application falls back
to the ASGI way (`progress_of` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EXTENSION = "wrapper.progress"


class RequestProgress:
    __slots__ = ("body_complete", "disconnected", "on_disconnect")

    def __init__(self) -> None:
        self.body_complete = False  # the whole body has been received
        self.disconnected = False  # the client's connection is closed
        self.on_disconnect: Callable[[], None] | None = None  # called once, when it closes

    def client_left(self) -> None:
        """From the server: the connection closed."""
        self.disconnected = True
        callback, self.on_disconnect = self.on_disconnect, None
        if callback is not None:
            callback()


def progress_of(scope: dict[str, Any]) -> RequestProgress | None:
    extensions = scope.get("extensions")
    return None if extensions is None else extensions.get(EXTENSION)
