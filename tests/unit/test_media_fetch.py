"""Fetching media URLs: redirects, DNS answers, size caps and timeouts, against a local server.

`images.example.test` plays a public host: the test resolver maps it to the
local server on 127.0.0.1, and the policy trusts exactly that pair. Every
other way to reach 127.0.0.1 (or any private address) stays refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio

from app.errors import APIError
from app.media.fetch import MAX_REDIRECTS, MediaFetcher
from app.media.url_rules import UrlPolicy
from tests.media_server import MediaServer, StaticResolver, sample_image

TEST_HOST = "images.example.test"
LOOPBACK = ipaddress.ip_address("127.0.0.1")
PNG = sample_image("PNG", (40, 30))


def policy(**overrides: object) -> UrlPolicy:
    settings: dict[str, object] = {
        "fetch_timeout_s": 2.0,
        "trusted_addresses": frozenset({(TEST_HOST, LOOPBACK)}),
    }
    settings.update(overrides)
    return UrlPolicy(**settings)  # type: ignore[arg-type]


def resolver(extra: dict[str, Sequence[Sequence[str]]] | None = None) -> StaticResolver:
    return StaticResolver({TEST_HOST: [["127.0.0.1"]], **(extra or {})})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MediaServer]:
    async with MediaServer() as media_server:
        media_server.add_file("/cat.png", PNG, "image/png")
        yield media_server


async def fetch(url: str, url_policy: UrlPolicy, dns: StaticResolver, max_bytes: int = 1_000_000) -> bytes:
    async with MediaFetcher(url_policy, resolver=dns) as fetcher:
        return await fetcher.fetch(url, max_bytes=max_bytes, limit_name="MAX_IMAGE_BYTES")


async def refused(url: str, url_policy: UrlPolicy, dns: StaticResolver, max_bytes: int = 1_000_000) -> APIError:
    with pytest.raises(APIError) as caught:
        await fetch(url, url_policy, dns, max_bytes)
    return caught.value


@pytest.mark.asyncio
async def test_fetches_from_a_public_host(server: MediaServer) -> None:
    assert await fetch(server.url("/cat.png", TEST_HOST), policy(), resolver()) == PNG
    assert [r.path for r in server.requests] == ["/cat.png"]
    assert server.requests[0].host_header == f"{TEST_HOST}:{server.port}"


@pytest.mark.asyncio
async def test_loopback_url_is_refused_by_default_and_allowed_when_private_urls_are(server: MediaServer) -> None:
    error = await refused(server.url("/cat.png"), policy(), resolver())
    assert error.status == 400 and "loopback" in error.message
    assert server.requests == []
    assert await fetch(server.url("/cat.png"), policy(allow_private=True), resolver()) == PNG


@pytest.mark.asyncio
async def test_a_host_name_resolving_to_a_private_address_is_refused_without_connecting(server: MediaServer) -> None:
    dns = resolver({"intranet.example.test": [["127.0.0.1"]]})
    error = await refused(server.url("/cat.png", "intranet.example.test"), policy(), dns)
    assert "'intranet.example.test' resolves to a loopback address" in error.message
    assert server.requests == []


@pytest.mark.asyncio
async def test_one_private_address_in_the_answer_refuses_the_host(server: MediaServer) -> None:
    dns = resolver({"mixed.example.test": [["93.184.216.34", "10.0.0.1"]]})
    error = await refused(server.url("/cat.png", "mixed.example.test"), policy(), dns)
    assert "resolves to a private address" in error.message


@pytest.mark.asyncio
@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/cat.png", "http://10.0.0.1/cat.png", "http://[::1]/x.png"])
async def test_a_redirect_to_a_private_address_is_refused(server: MediaServer, target: str) -> None:
    server.add_redirect("/go", target.format(port=server.port))
    error = await refused(server.url("/go", TEST_HOST), policy(), resolver())
    assert error.status == 400
    assert f"on host '{TEST_HOST}' redirects to a refused location" in error.message
    assert [r.path for r in server.requests] == ["/go"]


@pytest.mark.asyncio
async def test_a_redirect_to_a_host_name_resolving_privately_is_refused(server: MediaServer) -> None:
    server.add_redirect("/go", f"http://internal.example.test:{server.port}/cat.png")
    dns = resolver({"internal.example.test": [["127.0.0.1"]]})
    error = await refused(server.url("/go", TEST_HOST), policy(), dns)
    assert "'internal.example.test' resolves to a loopback address" in error.message
    assert [r.path for r in server.requests] == ["/go"]


@pytest.mark.asyncio
async def test_a_redirect_to_a_file_url_is_refused(server: MediaServer) -> None:
    server.add_redirect("/go", "file:///etc/passwd")
    error = await refused(server.url("/go", TEST_HOST), policy(), resolver())
    assert "scheme 'file:' is not allowed" in error.message


@pytest.mark.asyncio
async def test_relative_redirects_are_followed(server: MediaServer) -> None:
    server.add_redirect("/old/cat.png", "../cat.png", status=301)
    assert await fetch(server.url("/old/cat.png", TEST_HOST), policy(), resolver()) == PNG


@pytest.mark.asyncio
async def test_redirect_chains_are_cut_off(server: MediaServer) -> None:
    for hop in range(MAX_REDIRECTS + 1):
        server.add_redirect(f"/hop{hop}", f"/hop{hop + 1}")
    server.add_file(f"/hop{MAX_REDIRECTS + 1}", PNG, "image/png")
    error = await refused(server.url("/hop0", TEST_HOST), policy(), resolver())
    assert f"redirects more than {MAX_REDIRECTS} times" in error.message
    assert len(server.requests) == MAX_REDIRECTS + 1
    # One hop fewer is fine.
    assert await fetch(server.url("/hop1", TEST_HOST), policy(), resolver()) == PNG


@pytest.mark.asyncio
async def test_dns_rebinding_cannot_switch_the_address_after_the_check(server: MediaServer) -> None:
    # First answer: the trusted address. Every later answer: a private one.
    dns = StaticResolver({TEST_HOST: [["127.0.0.1"], ["10.0.0.1"]]})
    assert await fetch(server.url("/cat.png", TEST_HOST), policy(), dns) == PNG
    assert dns.lookups == {TEST_HOST: 1}  # resolved once; connected to that checked answer


@pytest.mark.asyncio
async def test_a_rebound_answer_is_refused_when_it_is_the_one_looked_up(server: MediaServer) -> None:
    dns = StaticResolver({"rebind.example.test": [["10.0.0.1"]]})
    trusting_first = policy(trusted_addresses=frozenset({("rebind.example.test", LOOPBACK)}))
    error = await refused(server.url("/cat.png", "rebind.example.test"), trusting_first, dns)
    assert "resolves to a private address" in error.message


@pytest.mark.asyncio
async def test_a_slow_host_times_out_naming_the_host(server: MediaServer) -> None:
    server.add_slow("/slow.png", 300)
    started = time.monotonic()
    error = await refused(server.url("/slow.png?token=secret", TEST_HOST), policy(fetch_timeout_s=0.5), resolver())
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 60, "the fetch was not cut at its timeout"
    assert error.status == 400
    assert f"host '{TEST_HOST}' timed out after 0.5 s" in error.message
    assert "secret" not in error.message and "/slow.png" not in error.message


@pytest.mark.asyncio
async def test_error_statuses_are_400_naming_the_host(server: MediaServer) -> None:
    server.add_status("/gone.png", 404)
    error = await refused(server.url("/gone.png", TEST_HOST), policy(), resolver())
    assert error.status == 400
    assert f"host '{TEST_HOST}' failed with HTTP status 404" in error.message


@pytest.mark.asyncio
async def test_connection_refused_and_unknown_hosts_are_400() -> None:
    async with MediaServer() as closed:
        port = closed.port  # nothing listens there once the block ends
    error = await refused(f"http://{TEST_HOST}:{port}/cat.png", policy(), resolver())
    assert error.status == 400 and f"Could not connect to media host '{TEST_HOST}'" in error.message
    error = await refused("http://unknown.example.test/cat.png", policy(), resolver())
    assert error.status == 400 and "'unknown.example.test' could not be resolved" in error.message


@pytest.mark.asyncio
@pytest.mark.parametrize("declare_length", [True, False])
async def test_bodies_over_the_limit_are_413(server: MediaServer, declare_length: bool) -> None:
    server.add_stream("/big.png", 300_000, declare_length=declare_length)
    error = await refused(server.url("/big.png", TEST_HOST), policy(), resolver(), max_bytes=100_000)
    assert error.status == 413
    assert "larger than MAX_IMAGE_BYTES=100000 bytes" in error.message
    assert await fetch(server.url("/big.png", TEST_HOST), policy(), resolver(), max_bytes=300_000) == b"\0" * 300_000


@pytest.mark.asyncio
async def test_allowed_domains_apply_to_redirect_targets(server: MediaServer) -> None:
    server.add_redirect("/go", f"http://other.example.test:{server.port}/cat.png")
    dns = resolver({"other.example.test": [["127.0.0.1"]]})
    only_test_host = policy(allowed_domains=(TEST_HOST,))
    assert await fetch(server.url("/cat.png", TEST_HOST), only_test_host, dns) == PNG
    error = await refused(server.url("/go", TEST_HOST), only_test_host, dns)
    assert "'other.example.test' is not in ALLOWED_MEDIA_DOMAINS" in error.message
