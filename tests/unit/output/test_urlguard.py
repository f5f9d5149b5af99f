"""The URL guard judges addresses, not the resolver's mood.

* Only an address in a non-public range is unsafe (final). A host that does not resolve right now
  is a transient failure: the same bounded retries as any other network blip.
* IPv6 spellings of IPv4 addresses (NAT64, 6to4, IPv4-mapped/-compatible/-translated) are judged
  by the IPv4 address they carry: ``64:ff9b::7f00:1`` is loopback, whatever Python 3.11's
  ``is_global`` says about it.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.output.download import DownloadLimits, download
from worker.output.errors import UnsafeURL
from worker.output.safe_http import GuardedAdapter
from worker.output.urlguard import check_url, is_public
from worker.retry import Retry, RetryPolicy, decide, is_retryable

#: A name the tests' resolver cannot resolve for now (EAI_AGAIN: "temporary failure in name
#: resolution", what a DNS server that times out or answers SERVFAIL gives).
BLIP_HOST = "cdn.blip.example"


@pytest.fixture
def dns_blip(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The resolver fails for :data:`BLIP_HOST` (and resolves everything else); returns the names
    looked up, so a test can see where the resolution happened."""
    real_getaddrinfo = socket.getaddrinfo
    looked_up: list[str] = []

    def blip(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(str(host))
        if host == BLIP_HOST:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", blip)
    return looked_up


# --------------------------------------------------------------------------------------------
# DNS failures are transient
# --------------------------------------------------------------------------------------------


def test_a_host_that_does_not_resolve_is_a_retryable_failure_not_an_unsafe_url(dns_blip: list[str]) -> None:
    with pytest.raises(Exception) as info:
        check_url(f"https://{BLIP_HOST}/out.mp4", allow_private=False)

    exc = info.value
    assert not isinstance(exc, UnsafeURL), "a DNS blip says nothing about where the host points"
    assert is_retryable(exc)
    assert BLIP_HOST in str(exc)
    assert isinstance(decide(exc, retries=0, policy=RetryPolicy(limit=3)), Retry)
    assert dns_blip == [BLIP_HOST]


def test_a_host_that_does_not_resolve_at_connect_time_is_retryable(dns_blip: list[str]) -> None:
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    with pytest.raises(Exception) as info:
        session.get(f"http://{BLIP_HOST}/out.mp4", timeout=5)
    assert not isinstance(info.value, UnsafeURL)
    assert is_retryable(info.value)


def test_a_download_from_a_host_that_does_not_resolve_is_retried(dns_blip: list[str], tmp_path: Path) -> None:
    limits = DownloadLimits(max_bytes=10**6, total_timeout=5.0)
    with pytest.raises(Exception) as info, requests.Session() as session:
        download(f"https://{BLIP_HOST}/out.mp4", dest_dir=tmp_path, limits=limits, session=session)
    assert not isinstance(info.value, UnsafeURL) and is_retryable(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [], "no temp file is left behind"


def test_a_host_resolving_to_a_private_address_is_still_unsafe() -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        check_url("http://localhost/hooks", allow_private=False)


# --------------------------------------------------------------------------------------------
# IPv6 spellings of IPv4 addresses
# --------------------------------------------------------------------------------------------

NON_PUBLIC = [
    # NAT64 (RFC 6052, the well-known prefix): the last 32 bits are the IPv4 address.
    "64:ff9b::7f00:1",  # 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # 169.254.169.254, cloud metadata
    "64:ff9b::a00:5",  # 10.0.0.5
    "64:ff9b::c0a8:101",  # 192.168.1.1
    # The local-use NAT64 prefix (RFC 8215): not globally reachable, and where the IPv4 address
    # sits in it is the network's own choice, so it cannot be checked.
    "64:ff9b:1::808:808",
    "64:ff9b:1:ffff::a9fe:a9fe",
    # 6to4 (RFC 3056): bits 16-48 are the IPv4 address.
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::",
    "2002:a00:1::1",
    # IPv4-mapped, IPv4-compatible (deprecated) and IPv4-translated (SIIT).
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::7f00:1",
    "::a9fe:a9fe",
    "::ffff:0:7f00:1",
    "::ffff:0:a9fe:a9fe",
    # Plain IPv6 that was already refused stays refused.
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
]

PUBLIC = [
    "64:ff9b::808:808",  # a DNS64 network's spelling of 8.8.8.8: must stay reachable
    "2002:808:808::1",
    "::ffff:8.8.8.8",
    "2606:4700:4700::1111",
    "8.8.8.8",
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_ipv6_spellings_of_non_public_ipv4_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_in_any_spelling_stay_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "2002:7f00:1::1", "::7f00:1", "64:ff9b:1::808:808"])
def test_a_url_on_such_an_address_is_refused_before_and_at_connect(address: str) -> None:
    url = f"http://[{address}]:8080/hooks"
    with pytest.raises(UnsafeURL, match="non-public"):
        check_url(url, allow_private=False)
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    with pytest.raises(UnsafeURL, match="non-public"):
        session.get(url, timeout=2)


# --------------------------------------------------------------------------------------------
# a real connection through a NAT64 spelling would reach loopback on a NAT64 host: refused at connect
# --------------------------------------------------------------------------------------------


def test_a_name_answering_a_nat64_loopback_address_is_refused_at_connect(
    internal_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS64 resolver hands out ``64:ff9b::7f00:1`` for a name whose A record is 127.0.0.1; on a
    NAT64 host that reaches the translator's loopback. The guard must see the IPv4 inside."""
    real_getaddrinfo = socket.getaddrinfo

    def dns64(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "internal.example":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::7f00:1", port, 0, 0))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns64)
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    with pytest.raises(UnsafeURL, match=r"64:ff9b::7f00:1"):
        session.get(f"http://internal.example:{internal_server}/", timeout=2)


def test_a_private_address_refusal_names_the_setting_that_allows_it() -> None:
    # Met first by whoever runs the worker against a simulator on loopback: the message must say
    # what to set, and that it is the SSRF guard.
    with pytest.raises(UnsafeURL, match=r"LIPSYNC_ALLOW_PRIVATE_URLS=true.*SSRF guard"):
        check_url("http://127.0.0.1:8700/cdn/x.mp4", allow_private=False)
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    with pytest.raises(UnsafeURL, match="LIPSYNC_ALLOW_PRIVATE_URLS"):
        session.get("http://localhost:9/x", timeout=2)
