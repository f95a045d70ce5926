"""Media URL rules: which URLs the wrapper refuses to fetch, before any connection."""

from __future__ import annotations

import ipaddress

import pytest

from app.config import ConfigError
from app.errors import APIError
from app.media.url_rules import UrlPolicy, check_address, check_url

DEFAULT = UrlPolicy()
PRIVATE_ALLOWED = UrlPolicy(allow_private=True)


def refusal(url: str, policy: UrlPolicy = DEFAULT) -> APIError:
    with pytest.raises(APIError) as caught:
        check_url(url, policy)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/a.png",
    ],
)
def test_only_http_and_https_are_fetched(url: str) -> None:
    message = refusal(url).message
    assert "scheme" in message and "http(s)" in message


def test_a_url_without_host_is_refused() -> None:
    assert "no host" in refusal("http:///x.png").message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data", "cloud metadata"),
        ("http://127.0.0.1:8001/v1/models", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.10/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "non-public"),
        ("http://[64:ff9b::a00:1]/", "private"),  # NAT64 form of 10.0.0.1
    ],
)
def test_non_public_ip_literals_are_refused(url: str, reason: str) -> None:
    assert reason in refusal(url).message


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0x7f.1", "127.1", "017700000001"])
def test_legacy_numeric_ipv4_forms_are_refused(host: str) -> None:
    assert "non-standard form" in refusal(f"http://{host}/x.png").message


def test_public_addresses_pass() -> None:
    assert check_url("https://93.184.216.34/cat.png", DEFAULT).host == "93.184.216.34"
    assert check_url("http://[2606:2800:220:1::1]/cat.png", DEFAULT).host == "2606:2800:220:1::1"
    assert check_url("https://images.example.com/cat.png?sig=1", DEFAULT).host == "images.example.com"


def test_allow_private_lifts_the_private_ban_only() -> None:
    for url in ("http://127.0.0.1:9000/x.png", "http://10.0.0.1/x.png", "http://[::1]/x.png", "http://169.254.1.1/x"):
        check_url(url, PRIVATE_ALLOWED)
    for url in ("http://169.254.169.254/latest/meta-data", "http://0.0.0.0/", "http://224.0.0.1/"):
        message = refusal(url, PRIVATE_ALLOWED).message
        assert "ALLOW_PRIVATE_MEDIA_URLS" not in message


def test_the_refusal_tells_how_to_allow_private_networks() -> None:
    assert "ALLOW_PRIVATE_MEDIA_URLS=true" in refusal("http://10.1.2.3/").message


def test_allowed_domains_exact_and_wildcard() -> None:
    policy = UrlPolicy(allowed_domains=("cdn.example.com", "*.images.example.org", "BÜCHER.de."))
    check_url("https://cdn.example.com/a.png", policy)
    check_url("https://CDN.example.com./a.png", policy)
    check_url("https://a.images.example.org/a.png", policy)
    check_url("https://a.b.images.example.org/a.png", policy)
    check_url("https://bücher.de/a.png", policy)
    for url in (
        "https://example.com/a.png",
        "https://images.example.org/a.png",  # the wildcard covers subdomains, not the domain itself
        "https://evilcdn.example.com/a.png",
        "https://cdn.example.com.evil.net/a.png",
        "https://93.184.216.34/a.png",
    ):
        assert "ALLOWED_MEDIA_DOMAINS" in refusal(url, policy).message


def test_allowed_domains_do_not_lift_the_address_rules() -> None:
    policy = UrlPolicy(allowed_domains=("127.0.0.1",))
    assert "loopback" in refusal("http://127.0.0.1/x.png", policy).message


def test_resolved_addresses_are_judged_like_literals() -> None:
    with pytest.raises(APIError, match="resolves to a private address"):
        check_address("media.example.com", ipaddress.ip_address("10.0.0.7"), DEFAULT)
    with pytest.raises(APIError, match="resolves to a loopback address"):
        check_address("media.example.com", ipaddress.ip_address("::ffff:127.0.0.1"), DEFAULT)
    check_address("media.example.com", ipaddress.ip_address("93.184.216.34"), DEFAULT)


def test_trusted_pairs_allow_one_host_on_one_address() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    policy = UrlPolicy(trusted_addresses=frozenset({("images.example.test", loopback)}))
    check_address("images.example.test", loopback, policy)
    check_address("IMAGES.example.test.", loopback, policy)
    with pytest.raises(APIError):
        check_address("images.example.test", ipaddress.ip_address("10.0.0.1"), policy)
    with pytest.raises(APIError):
        check_address("other.example.test", loopback, policy)
    with pytest.raises(APIError):
        check_url("http://127.0.0.1/x.png", policy)


@pytest.mark.parametrize("entry", ["https://cdn.example.com", "cdn.example.com:443", "cdn.example.com/images", "*."])
def test_malformed_allowed_domains_fail_at_start_naming_the_setting(entry: str) -> None:
    with pytest.raises(ConfigError, match="ALLOWED_MEDIA_DOMAINS"):
        UrlPolicy(allowed_domains=(entry,))
