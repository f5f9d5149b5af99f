"""Refuse URLs that point into our own network (SSRF guard for downloads and webhooks).

GEN hands us output URLs and callers hand us webhook URLs; either could aim a worker at
``169.254.169.254`` or an internal service. We allow only http(s) and refuse any host that resolves
to a non-public address unless ``LIPSYNC_ALLOW_PRIVATE_URLS`` is set (tests, the demo, a simulator
inside the cluster). Redirects are not followed automatically; callers re-check every hop. The
check is repeated where the socket is opened (:mod:`worker.output.safe_http`), so a second DNS answer
cannot point the connection elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from worker.output.errors import UnsafeURL

#: Redirect hops followed at most, each one re-checked.
MAX_REDIRECTS = 3


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not private, loopback, link-local (cloud metadata), reserved..."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


def resolve_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` resolves to (a literal IP resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def check_url(url: str, *, allow_private: bool) -> str:
    """Return ``url`` if it is safe to fetch, else raise :class:`UnsafeURL` saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("URLs with credentials are not allowed")
    if allow_private:
        return url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in resolve_addresses(parts.hostname, port):
        if not is_public(address):
            raise UnsafeURL(f"host {parts.hostname!r} resolves to non-public address {address}")
    return url
