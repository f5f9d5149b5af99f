"""HTTP connections that only ever open sockets to addresses the URL guard allows.

:func:`worker.output.urlguard.check_url` resolves a host and checks its addresses before a request, but the
connection resolves the name again: a hostile DNS server can answer a public address the first
time and ``127.0.0.1`` the second (DNS rebinding). Here the check happens where the socket is
opened: the connection resolves once, refuses any non-public answer, and connects to the address it
checked. Sessions used for downloads and webhooks mount :class:`GuardedAdapter`
(:func:`egress_session` builds them).

A proxy would defeat that check: urllib3's proxy manager opens its socket to the proxy, never to
the target. So these sessions ignore ``HTTP(S)_PROXY`` from the environment, and a proxy is only
the one ``LIPSYNC_EGRESS_PROXY`` names, deliberately: that proxy is then the egress filter (it
resolves and connects), while :func:`worker.output.urlguard.check_url` still refuses, before each
request, a target whose name resolves here to a non-public address.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import connection as urllib3_connection

from worker.output.errors import private_address
from worker.output.urlguard import is_public, resolve_addresses


class _GuardedConnect:
    """Mixin for urllib3 connections: resolve, check every address, connect to a checked one."""

    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> Any:
        host = self.host.strip("[]")
        addresses = resolve_addresses(host, self.port)
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise private_address(host, refused[0])
        return urllib3_connection.create_connection(
            (str(addresses[0]), self.port),
            self.timeout,
            source_address=self.source_address,
            socket_options=self.socket_options,
        )


class GuardedHTTPConnection(_GuardedConnect, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnect, HTTPSConnection):
    # TLS still verifies the certificate against the URL's host name: only the socket's target
    # address is pinned.
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections refuse non-public addresses at connect time."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        self.poolmanager = PoolManager(num_pools=connections, maxsize=maxsize, block=block, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def egress_session(*, allow_private: bool, proxy: str | None, user_agent: str) -> requests.Session:
    """The session for output downloads and webhooks: URLs that come from outside.

    Without ``allow_private`` every connection is checked where its socket opens. Proxies come
    from ``proxy`` only, never from the environment (see the module's docstring).
    """
    session = requests.Session()
    session.headers["User-Agent"] = user_agent
    # trust_env also drops ~/.netrc credentials (which must not go to URLs from outside) and the
    # environment's CA bundle, which a TLS-inspecting egress needs: keep that one, as requests would.
    session.trust_env = False
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    if proxy:
        session.proxies = {"http": proxy, "https": proxy}
    if not allow_private:
        guarded = GuardedAdapter()
        session.mount("http://", guarded)
        session.mount("https://", guarded)
    return session
