"""Which media URLs the wrapper may fetch: the server-side request forgery rules.

A chat request can name any URL as an image or video. Without rules, a
client could make the server fetch `http://169.254.169.254/latest/meta-data`
(cloud credentials), `http://127.0.0.1:8001/...` (the engine itself) or any
host on the private network. The rules here decide, before any connection:

- only `http` and `https` URLs are fetched;
- with ALLOWED_MEDIA_DOMAINS set, only those hosts (`*.example.com` covers
  subdomains of example.com);
- the addresses a host resolves to must all be public. Loopback, private,
  link-local and shared (carrier-grade NAT) addresses are allowed only with
  ALLOW_PRIVATE_MEDIA_URLS=true; cloud metadata, unspecified, multicast and
  reserved addresses never are. IPv4 addresses embedded in IPv6 (`::ffff:a.b.c.d`,
  NAT64 `64:ff9b::/96`) are judged as the IPv4 address they reach.

`check_address` is called on the exact addresses the fetcher then connects
to (see `app.media.fetch`), so a DNS answer that changes between check and
use cannot slip past it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from yarl import URL

from app.config import ConfigError
from app.errors import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Instance metadata and credential endpoints of the big clouds (AWS IMDS and
# ECS/EKS agents, GCP, Azure, Oracle, Alibaba, Tencent). Refused even when
# private addresses are allowed: no media lives there.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "169.254.0.23",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)

NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """The URL rules of one server, built from its settings."""

    allowed_domains: tuple[str, ...] = ()
    allow_private: bool = False
    fetch_timeout_s: float = 10.0
    # (host, address) pairs allowed although the address is not public. No
    # setting fills it: it lets tests serve a "public" host from 127.0.0.1
    # without allowing 127.0.0.1 itself or any other host.
    trusted_addresses: frozenset[tuple[str, IPAddress]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_domains", tuple(_normalize_domain(d) for d in self.allowed_domains))


def check_url(raw_url: str, policy: UrlPolicy) -> URL:
    """Parse a media URL and apply the scheme, domain and IP-literal rules.

    Host names are checked later, on the addresses they resolve to.
    """
    try:
        url = URL(raw_url)
    except (ValueError, TypeError):
        raise APIError(400, "The media URL is not a valid URL; send an http(s) URL or a base64 data: URL.") from None
    scheme = url.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}:'" if scheme else "(none)"
        raise APIError(
            400,
            f"Media URL scheme {shown} is not allowed; send an http(s) URL or a base64 data: URL.",
        )
    host = url.raw_host
    if not host:
        raise APIError(400, "The media URL has no host; send an absolute http(s) URL.")
    host = normalize_host(host)
    if policy.allowed_domains and not host_matches(host, policy.allowed_domains):
        raise APIError(
            400,
            f"Media host '{url.host}' is not in ALLOWED_MEDIA_DOMAINS; "
            "use an allowed host or send the media inline as a base64 data: URL.",
        )
    literal = _ip_literal(host)
    if literal is not None:
        check_address(host, literal, policy)
    return url


def check_address(host: str, address: IPAddress, policy: UrlPolicy) -> None:
    """Refuse `address` (an address `host` resolved to) unless the policy allows it."""
    host = normalize_host(host)
    if (host, address) in policy.trusted_addresses:
        return
    embedded = _reachable_ipv4(address)
    reason = _refusal_reason(address if embedded is None else embedded, policy.allow_private)
    if reason is None:
        return
    verb = "is" if _parse_ip(host) is not None else "resolves to"
    message = f"Media host '{host}' {verb} {reason}; media URLs must point to public addresses"
    if reason in _ALWAYS_REFUSED:
        raise APIError(400, f"{message}.")
    raise APIError(400, f"{message} (ALLOW_PRIVATE_MEDIA_URLS=true allows private networks).")


def host_matches(host: str, domains: tuple[str, ...]) -> bool:
    """Exact host match, or a subdomain match for `*.example.com` entries."""
    for domain in domains:
        if domain.startswith("*."):
            if host.endswith(domain[1:]):
                return True
        elif host == domain:
            return True
    return False


def normalize_host(host: str) -> str:
    return host.lower().rstrip(".")


_METADATA = "a cloud metadata address"
_UNSPECIFIED = "an unspecified address"
_MULTICAST = "a multicast address"
_RESERVED = "a reserved address"
_ALWAYS_REFUSED = frozenset({_METADATA, _UNSPECIFIED, _MULTICAST, _RESERVED})


def _refusal_reason(address: IPAddress, allow_private: bool) -> str | None:
    if address in METADATA_ADDRESSES:
        return _METADATA
    if address.is_unspecified:
        return _UNSPECIFIED
    if address.is_multicast:
        return _MULTICAST
    if address.is_loopback:
        reason = "a loopback address"
    elif address.is_link_local:
        reason = "a link-local address"
    elif address.is_reserved:
        return _RESERVED
    elif address.is_private:
        reason = "a private address"
    elif not address.is_global:
        reason = "a non-public address"
    else:
        return None
    return None if allow_private else reason


def _reachable_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really connects to, if it embeds one."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _ip_literal(host: str) -> IPAddress | None:
    """The address of an IP-literal host; refuses the legacy numeric IPv4 forms."""
    address = _parse_ip(host)
    if address is not None:
        return address
    if ":" in host:
        raise APIError(400, f"Media host '{host}' is not a valid IPv6 address.")
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    # 2130706433, 0x7f.1 and 127.1 all mean 127.0.0.1 to the C resolver.
    raise APIError(
        400,
        f"Media host '{host}' is an IPv4 address in a non-standard form; write it as four decimal numbers (a.b.c.d).",
    )


def _normalize_domain(domain: str) -> str:
    """Lower-case, no trailing dot, internationalized names in their ASCII (punycode) form."""
    wildcard = domain.startswith("*.")
    name = normalize_host(domain[2:] if wildcard else domain)
    try:
        ascii_name = URL.build(scheme="http", host=name).raw_host
    except ValueError:
        ascii_name = None
    if not ascii_name:
        raise ConfigError(
            f"Invalid setting ALLOWED_MEDIA_DOMAINS: '{domain}' is not a host name "
            "(write hosts like cdn.example.com or *.example.com, without scheme, port or path)"
        )
    return f"*.{ascii_name}" if wildcard else ascii_name
