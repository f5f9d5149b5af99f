"""Refuse URLs that point into our own network (SSRF guard for downloads and webhooks).

GEN hands us output URLs and callers hand us webhook URLs; either could aim a worker at
``169.254.169.254`` or an internal service. We allow only http(s) and refuse any host that resolves
to a non-public address unless ``LIPSYNC_ALLOW_PRIVATE_URLS`` is set (tests, the demo, a simulator
inside the cluster). Redirects are not followed automatically; callers re-check every hop. The
check is repeated where the socket is opened (:mod:`worker.output.safe_http`), so a second DNS answer
cannot point the connection elsewhere.

Only an address makes a URL unsafe (:class:`UnsafeURL`, final). A host that does not resolve right
now is :class:`HostUnresolved`, retried like any network blip: failing a paid job, or dead-lettering
a webhook, because one DNS query timed out would be wrong.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from worker.output.errors import HostUnresolved, UnsafeURL, private_address

#: Redirect hops followed at most, each one re-checked.
MAX_REDIRECTS = 3


#: IPv6 prefixes whose last 32 bits are an IPv4 address that a translator, tunnel or dual stack
#: connects to: NAT64's well-known prefix (RFC 6052), IPv4-translated (SIIT, RFC 2765) and
#: IPv4-compatible (deprecated, RFC 4291; it covers ``::`` and ``::1`` too). IPv4-mapped and 6to4
#: are read by ``ipaddress`` itself (``ipv4_mapped``, ``sixtofour``).
_EMBEDDING_IPV4_LAST = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
#: NAT64's local-use prefix (RFC 8215): not globally reachable (IANA), and where the IPv4 address
#: sits inside it is the local network's choice, so no address in it can be checked.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 spelling reaches (NAT64, 6to4, IPv4-mapped...), or None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in _EMBEDDING_IPV4_LAST):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not private, loopback, link-local (cloud metadata), reserved...

    An IPv6 spelling of an IPv4 address is judged by that IPv4 address: Python 3.11 calls
    ``64:ff9b::7f00:1`` (NAT64 for 127.0.0.1) global, but on a NAT64 network it reaches loopback.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        inner = embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
    return address.is_global and not address.is_multicast


def resolve_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` resolves to (a literal IP resolves to itself).

    Raises :class:`HostUnresolved` (retryable) when resolution fails, :class:`UnsafeURL` when the
    name cannot be a host name at all.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HostUnresolved(f"cannot resolve host {host!r}: {exc.strerror}") from None
    except UnicodeError:
        # The IDNA codec refuses the name (an empty or over-long label): no resolver will take it.
        raise UnsafeURL(f"{host!r} is not a valid host name") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def check_url(url: str, *, allow_private: bool) -> str:
    """Return ``url`` if it is safe to fetch, else raise :class:`UnsafeURL` saying why (or
    :class:`HostUnresolved`: whether it is safe is not known yet)."""
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
            raise private_address(parts.hostname, address)
    return url
