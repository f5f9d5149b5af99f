"""HTTP connections that only ever open sockets to addresses the URL guard allows.

:func:`worker.output.urlguard.check_url` resolves a host and checks its addresses before a request, but the
connection resolves the name again: a hostile DNS server can answer a public address the first
time and ``127.0.0.1`` the second (DNS rebinding). Here the check happens where the socket is
opened: the connection resolves once, refuses any non-public answer, and connects to the address it
checked. Sessions used for downloads and webhooks mount :class:`GuardedAdapter`.
"""

from __future__ import annotations

from typing import Any

from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import connection as urllib3_connection

from worker.output.errors import UnsafeURL
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
            raise UnsafeURL(f"host {host!r} resolves to non-public address {refused[0]}")
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
