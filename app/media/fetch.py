"""The wrapper fetches media URLs itself and hands the engine inline data.

Why not let the engine fetch them: its fetcher follows redirects and
resolves DNS again when it connects, so a URL that passes a check here could
still land on 169.254.169.254 or 127.0.0.1 (a redirect to it, or a DNS answer
that changes between check and use). It also answers an unreachable URL
with a 500 after about 5 s of retries and drops the connection. So every
http(s) media URL is fetched here and replaced by a `data:` URL; the engine
never fetches anything.

How a fetch stays on validated addresses:

- `check_url` (scheme, ALLOWED_MEDIA_DOMAINS, IP-literal hosts) runs on the
  URL and on every redirect target; redirects are followed here, at most
  MAX_REDIRECTS of them.
- Host names are resolved by the connector's resolver, wrapped so that every
  address of the answer is checked (`check_address`) and the connector then
  connects to exactly those addresses. Check and use are one step, so DNS
  rebinding has no window. The connector's DNS cache is off, and no proxy
  from the environment is used (a proxy would resolve names itself).
- The body is read in chunks and cut off above the size limit (also when a
  Content-Length announces it); the whole fetch, redirects included, is
  bounded by MEDIA_FETCH_TIMEOUT_S.
- One host gets at most FETCH_CONNECTIONS_PER_HOST connections of the pool
  (`app.media.pool`), so a slow host cannot hold every connection.

Errors are 400s that name the host, never the full URL (its query string
may carry a signed token); a body over the limit is a 413.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from app.errors import APIError
from app.media.pool import FETCH_CONNECTIONS, FETCH_CONNECTIONS_PER_HOST
from app.media.url_rules import UrlPolicy, check_address, check_url

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024
REQUEST_HEADERS = {"User-Agent": "vllm-inference-api-media-fetcher", "Accept": "image/*, video/*"}


class MediaFetcher:
    """Fetches media URLs under a `UrlPolicy`, over one shared aiohttp session.

    Use `async with MediaFetcher(policy) as fetcher`, or `await start()` and
    `await close()` around the server's lifetime. `resolver` replaces the
    system resolver (tests map test host names to a local server).
    """

    def __init__(self, policy: UrlPolicy, *, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        resolver = _CheckedResolver(self._resolver or aiohttp.ThreadedResolver(), self.policy)
        connector = aiohttp.TCPConnector(
            resolver=resolver,
            use_dns_cache=False,
            limit=FETCH_CONNECTIONS,
            limit_per_host=FETCH_CONNECTIONS_PER_HOST,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=REQUEST_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def fetch(self, raw_url: str, *, max_bytes: int, limit_name: str) -> bytes:
        """The body of `raw_url`, at most `max_bytes` long (`limit_name` is the setting named in a 413)."""
        if self._session is None:
            raise RuntimeError("MediaFetcher.start() has not been awaited")
        url = check_url(raw_url, self.policy)
        host = url.host
        timeout_s = self.policy.fetch_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    async with self._session.get(url, allow_redirects=False) as response:
                        if response.status in REDIRECT_STATUSES:
                            url = self._redirect_target(response, host)
                            continue
                        if not 200 <= response.status < 300:
                            raise APIError(
                                400,
                                f"Fetching media from host '{host}' failed with HTTP status {response.status}; "
                                "check that the URL is correct and publicly readable.",
                            )
                        return await _read_capped(response, max_bytes, limit_name, host)
        except TimeoutError:
            raise APIError(
                400,
                f"Fetching media from host '{host}' timed out after {timeout_s:g} s (MEDIA_FETCH_TIMEOUT_S); "
                "use a faster host or send the media inline as a base64 data: URL.",
            ) from None
        except aiohttp.ClientConnectorDNSError:
            raise APIError(400, f"Media host '{host}' could not be resolved; check the URL.") from None
        except aiohttp.ClientConnectorCertificateError:
            raise APIError(400, f"The TLS certificate of media host '{host}' could not be verified.") from None
        except aiohttp.ClientConnectorError:
            raise APIError(400, f"Could not connect to media host '{host}'; check the URL.") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise APIError(400, f"Fetching media from host '{host}' failed ({type(exc).__name__}).") from None
        raise APIError(400, f"The media URL on host '{host}' redirects more than {MAX_REDIRECTS} times.")

    def _redirect_target(self, response: aiohttp.ClientResponse, origin_host: str | None) -> URL:
        location = response.headers.get("Location")
        if not location:
            raise APIError(400, f"Media host '{origin_host}' answered a redirect without a Location header.")
        try:
            return check_url(str(response.url.join(URL(location))), self.policy)
        except APIError as refused:
            raise APIError(
                400, f"The media URL on host '{origin_host}' redirects to a refused location: {refused.message}"
            ) from None
        except ValueError:
            raise APIError(400, f"Media host '{origin_host}' redirects to an invalid URL.") from None


class _CheckedResolver(AbstractResolver):
    """Resolves with `inner`, and returns the answer only if every address passes the policy."""

    def __init__(self, inner: AbstractResolver, policy: UrlPolicy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            try:
                address = ipaddress.ip_address(answer["host"])
            except ValueError:
                raise APIError(400, f"Media host '{host}' resolves to an address that cannot be checked.") from None
            check_address(host, address, self._policy)
        return answers

    async def close(self) -> None:
        await self._inner.close()


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int, limit_name: str, host: str | None) -> bytes:
    too_large = APIError(
        413, f"The media on host '{host}' is larger than {limit_name}={max_bytes} bytes; send a smaller file."
    )
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)
