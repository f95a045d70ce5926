"""`serve_exchange`: a client that leaves cancels the work and is logged as 499, under any server.

The wrapper's own server reports the hang-up through the request's
`RequestProgress`; under another ASGI server the reply learns it from
`http.disconnect`. Both must end the work the same way, and neither may cut
a response the client already has whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.observability.record import RequestRecord
from app.proxy.reply import Reply, serve_exchange
from app.request_progress import RequestProgress

WAIT_S = 30.0


class Client:
    """ASGI receive/send of one client; `leave()` makes the next receive answer http.disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._left.set()


def new_record() -> RequestRecord:
    return RequestRecord(request_id="r", method="POST", path="/v1/x", route="/v1/x", client=None)


async def endless(reply: Reply) -> None:
    await reply.start(200, [])
    await reply.chunk(b"data: first\n\n")
    await asyncio.sleep(3600)


async def serve_until_left(progress: RequestProgress | None) -> tuple[RequestRecord, Client]:
    client, record = Client(), new_record()
    serving = asyncio.ensure_future(serve_exchange(client.send, client.receive, record, endless, progress))
    async with asyncio.timeout(WAIT_S):
        while not client.sent:
            await asyncio.sleep(0.01)
        client.leave()
        if progress is not None:
            progress.client_left()  # what the server does when the connection closes
        await serving
    return record, client


async def test_a_client_that_leaves_is_499_with_the_servers_progress() -> None:
    progress = RequestProgress()

    record, _ = await serve_until_left(progress)

    assert (record.status, record.error_cause) == (499, "client_disconnected")
    assert progress.on_disconnect is None  # nothing of the request stays tied to its scope


async def test_a_client_that_leaves_is_499_under_any_server() -> None:
    record, _ = await serve_until_left(None)

    assert (record.status, record.error_cause) == (499, "client_disconnected")


async def test_a_client_already_gone_ends_the_work_at_its_first_wait() -> None:
    progress = RequestProgress()
    progress.client_left()
    client, record = Client(), new_record()

    async with asyncio.timeout(WAIT_S):
        await serve_exchange(client.send, client.receive, record, endless, progress)

    assert record.status == 499


async def test_leaving_after_the_whole_answer_is_no_abort() -> None:
    progress = RequestProgress()
    client, record = Client(), new_record()

    async def answer(reply: Reply) -> None:
        await reply.start(200, [])
        await reply.finish(b"{}")
        progress.client_left()  # the client hangs up as soon as it has everything
        await asyncio.sleep(0)

    await serve_exchange(client.send, client.receive, record, answer, progress)

    assert record.status == 0 and record.error_cause is None  # the relay sets the status it answered
    assert client.sent[-1] == {"type": "http.response.body", "body": b"{}", "more_body": False}
