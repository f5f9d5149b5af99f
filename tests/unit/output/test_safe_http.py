"""The URL guard holds where the socket is opened, including against DNS rebinding."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import requests

from worker.output.errors import UnsafeURL
from worker.output.safe_http import GuardedAdapter
from worker.output.urlguard import check_url


def guarded_session() -> requests.Session:
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    session.mount("https://", GuardedAdapter())
    return session


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_is_refused_at_connect(internal_server: int, host: str) -> None:
    with pytest.raises(UnsafeURL):
        guarded_session().get(f"http://{host}:{internal_server}/", timeout=5)


def test_dns_rebinding_is_caught_at_connect(internal_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first resolution (the pre-check) says public; the second (the connection) says loopback."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["93.184.216.34", "127.0.0.1"])

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            return real_getaddrinfo(next(answers), port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.example:{internal_server}/"
    assert check_url(url, allow_private=False) == url  # the pre-check is fooled...
    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1"):  # ...the connection is not
        guarded_session().get(url, timeout=5)


def test_metadata_address_is_refused() -> None:
    with pytest.raises(UnsafeURL):
        guarded_session().get("http://169.254.169.254/latest/meta-data/", timeout=2)


def test_an_unguarded_session_would_have_connected(internal_server: int) -> None:
    assert requests.get(f"http://127.0.0.1:{internal_server}/", timeout=5).text == "ok"
