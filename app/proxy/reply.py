"""The client side of one exchange, shared by the `/v1` relay and `/generate`.

Both answer with a JSON body or a server-sent event stream, and both must
behave the same when things go wrong:

- before the first token, a stream sends `: keep-alive` comments every
  `SSE_KEEPALIVE_S`, so proxies that cut silent connections (RunPod's after
  about 100 s) do not;
- a failure before the response began is a JSON error with its status; once a
  stream began, it is a final `data: {"error": ...}` event and `data: [DONE]`,
  never a silent cut;
- a client that disconnects cancels the task serving it, which closes the
  engine connection, so the engine aborts the generation (status 499 in the
  log line). The wrapper's server says so through the request's
  `RequestProgress`; under another server a watcher task waits for
  `http.disconnect`.

`serve_exchange` runs one exchange with these rules; `Reply` is what it
hands the work: the ASGI `send` plus what was sent and whether the client left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from app.errors import APIError
from app.observability.record import RequestRecord
from app.request_progress import RequestProgress

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def error_event(error: APIError) -> bytes:
    """The last events of a stream that failed after it began."""
    return b"data: " + error.json_bytes() + b"\n\n" + DONE


class Reply:
    """The response to one client, and whether that client is still there.

    A client that leaves cancels the serving task: `progress` calls back when
    the server has one, else a watcher task waits for `http.disconnect`. It
    only fires while armed, i.e. before the last message is handed to the
    server, so a cancellation always lands inside `serve_exchange`.
    """

    def __init__(self, send: Any, receive: Any, task: asyncio.Task[Any], progress: RequestProgress | None) -> None:
        self.send = send
        self.started = False
        self.completed = False
        self.client_gone = False
        self._armed = True
        self._task = task
        self._progress = progress
        self._watcher: asyncio.Task[None] | None = None
        if progress is None:
            self._watcher = task.get_loop().create_task(self._watch(receive))
        elif progress.disconnected:
            self._client_left()
        else:
            progress.on_disconnect = self._client_left

    def _client_left(self) -> None:
        if self._armed:
            self.client_gone = True
            self._task.cancel()

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                return

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self, body: bytes) -> None:
        self.disarm()
        self.completed = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def fail(self, error: APIError) -> None:
        """Answer `error`: a JSON response, or the final events of a stream that already began."""
        if self.completed or self.client_gone:
            return
        if self.started:
            await self.finish(error_event(error))
            return
        self.disarm()
        self.completed = True
        await send_error(self.send, error)

    async def first_chunk(
        self, read: Awaitable[bytes], keepalive_s: float, start: tuple[int, list[tuple[bytes, bytes]]] | None = None
    ) -> bytes:
        """Await the first bytes of a stream, sending keep-alive comments while the engine is silent.

        `start` is the status and headers to begin a response not yet begun with,
        should a keep-alive have to go out first.
        """
        first = asyncio.ensure_future(read)
        try:
            while True:
                done, _ = await asyncio.wait((first,), timeout=keepalive_s)
                if done:
                    return first.result()
                if not self.started and start is not None:
                    await self.start(*start)
                await self.chunk(KEEPALIVE)
        finally:
            if not first.done():
                first.cancel()

    def disarm(self) -> None:
        """The client has everything it needs: hanging up from now on is no abort."""
        self._armed = False

    def close(self) -> None:
        self._armed = False
        if self._progress is not None:
            self._progress.on_disconnect = None  # the callback would tie the request's objects to its scope
        elif not self.completed and self._watcher is not None:
            # Once the response is complete, the server answers the pending `receive`
            # with http.disconnect and the watcher ends by itself. Cancelling it would
            # leave a CancelledError whose traceback ties the request's objects into
            # a reference cycle, which only the garbage collector can free.
            self._watcher.cancel()


async def serve_exchange(
    send: Any, receive: Any, record: RequestRecord, work: Callable[[Reply], Awaitable[None]],
    progress: RequestProgress | None = None,
) -> None:
    """Run `work` for one client: its `APIError`s answered, a client that leaves logged as 499."""
    task = asyncio.current_task()
    assert task is not None
    reply = Reply(send, receive, task, progress)
    try:
        await work(reply)
    except APIError as error:
        record.error_cause = error.cause
        if not reply.started:
            record.status = error.status
        await reply.fail(error)
    except asyncio.CancelledError:
        if not reply.client_gone:
            raise
        task.uncancel()
        record.status, record.error_cause = 499, "client_disconnected"
    finally:
        reply.close()


async def send_error(send: Any, error: APIError) -> None:
    """The whole response: `error` as a JSON body."""
    body = error.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
