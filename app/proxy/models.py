"""Which engine a request goes to when one deployment serves several models (MODELS).

The request's `model` picks the model: an unknown name is answered 404 with
the names served, before anything else happens. A known one is leased from
the supervisor over its control socket (`app.lifecycle.model_engines`), which
loads the model if needed and returns its engine's URL. This process holds
one lease per model while it has requests in flight for it (taken by the
first, given back after the last), so steady traffic costs no call to the
supervisor, and a model with requests in flight here is never unloaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp

from app.errors import APIError, unavailable
from app.proxy.reply import KEEPALIVE, SSE_HEADERS, Reply

log = logging.getLogger("app.serve")


Waiter = Callable[["asyncio.Future[str]"], Awaitable[str]]


async def plain_wait(acquiring: asyncio.Future[str]) -> str:
    return await acquiring


def keepalive_wait(reply: Reply, keepalive_s: float) -> Waiter:
    """For a stream: when its model takes longer than `keepalive_s` to be there (it is loading), the
    answer begins with keep-alive comments until it is; a quicker one is answered as usual."""

    async def wait(acquiring: asyncio.Future[str]) -> str:
        while True:
            done, _ = await asyncio.wait((acquiring,), timeout=keepalive_s)
            if done:
                return acquiring.result()
            if not reply.started:
                await reply.start(200, SSE_HEADERS)
            await reply.chunk(KEEPALIVE)

    return wait


@dataclass
class _Lease:
    users: int = 0
    acquiring: asyncio.Task[str] | None = None


@dataclass
class ModelRouter:
    names: tuple[str, ...]
    socket_path: str
    wait_timeout_s: float
    # Every model's state as the supervisor publishes it (the status file's `models`).
    states: Callable[[], Mapping[str, Mapping[str, object]]] = dict
    _created: int = field(default_factory=lambda: int(time.time()))
    _leases: dict[str, _Lease] = field(default_factory=dict)
    _releases: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def check(self, model: object) -> str:
        """The model a request names, or the 400/404 that says which names this server serves."""
        served = ", ".join(self.names)
        if not isinstance(model, str) or not model:
            raise APIError(400, f"Name the model in `model`; this server serves: {served}.", param="model",
                           code="model_required")
        if model not in self.names:
            raise APIError(404, f"The model '{model[:256]}' does not exist; this server serves: {served}.",
                           param="model", code="model_not_found")
        return model

    def listing(self) -> bytes:
        """/v1/models: every configured model, with its state (unloaded, loading, loaded, unloading, sleeping, failed)."""
        states = self.states()
        data = [
            {
                "id": name, "object": "model", "created": self._created, "owned_by": "vllm-inference-api",
                "state": str(states.get(name, {}).get("state", "unloaded")),
            }
            for name in self.names
        ]
        return json.dumps({"object": "list", "data": data}).encode()

    @asynccontextmanager
    async def lease(self, model: str, wait: Waiter = plain_wait) -> AsyncIterator[str]:
        """The URL of `model`'s engine, loaded if needed; it stays loaded until the block ends.

        `wait` awaits the acquire when it has not finished at once (a stream sends keep-alives meanwhile).
        """
        lease = self._leases.setdefault(model, _Lease())
        lease.users += 1
        try:
            if lease.acquiring is None:
                lease.acquiring = asyncio.create_task(self._acquire(model), name=f"acquire {model}")
                lease.acquiring.add_done_callback(lambda _task: self._settle(model))
            acquiring = lease.acquiring
            yield acquiring.result() if acquiring.done() else await wait(asyncio.shield(acquiring))
        finally:
            lease.users -= 1
            self._settle(model)

    def _settle(self, model: str) -> None:
        """Give the lease back once nobody here uses it; a failed acquire is forgotten at once."""
        lease = self._leases[model]
        task = lease.acquiring
        if task is None or not task.done():
            return
        failed = task.cancelled() or task.exception() is not None
        if failed:
            lease.acquiring = None
        elif lease.users == 0:
            lease.acquiring = None
            release = asyncio.create_task(self._call("release", model), name=f"release {model}")
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def load(self, model: str) -> None:
        """An operator's load: the model's engine started (if needed), then left idle."""
        async with self.lease(self.check(model)):
            pass

    async def unload(self, model: str) -> None:
        """An operator's unload: the model's engine stopped; 409 while it has requests in flight."""
        await self._call("unload", self.check(model))

    async def _acquire(self, model: str) -> str:
        return str((await self._call("acquire", model))["url"])

    async def _call(self, action: str, model: str) -> dict[str, object]:
        assert self._session is not None, "ModelRouter.start() was not called"
        try:
            async with self._session.post(
                f"http://supervisor/{action}", json={"model": model},
                timeout=aiohttp.ClientTimeout(total=self.wait_timeout_s),
            ) as response:
                payload = await response.json()
        except (aiohttp.ClientError, OSError, ValueError):
            if action == "release":
                log.warning("could not give a model lease back", extra={"model": model})
                return {}
            raise unavailable("Models are not ready yet; retry shortly.", code="not_ready") from None
        except TimeoutError:
            raise unavailable(
                f"The model '{model}' did not load within REQUEST_TIMEOUT_S={self.wait_timeout_s:g}s; retry later.",
                code="model_loading",
            ) from None
        if response.status == 503:
            raise unavailable(str(payload.get("error")), retry_after_s=30, code="model_load_failed")
        if response.status == 409:
            raise APIError(409, str(payload.get("error")), param="model", code="model_busy")
        if response.status != 200:
            raise APIError(response.status, str(payload.get("error")), param="model", code="model_not_found")
        return payload
