"""Downloads and webhooks leave the worker only the way the settings say.

``HTTP(S)_PROXY`` in the environment would route around the connect-time URL guard: urllib3's proxy
manager opens its socket to the proxy, never to the target, so the guard would check nothing. The
session for outputs and webhooks ignores the environment; a proxy is the explicit
``LIPSYNC_EGRESS_PROXY``, which then is the egress filter (targets are still checked by resolution
before each request). Each test runs real listeners on loopback and asserts who got connected to.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.unit.conftest import unit_settings
from worker.callbacks.webhooks import post_webhook
from worker.jobs.resources import Resources
from worker.output.errors import UnsafeURL

#: Nothing connects to these: Resources.http opens no Redis or GEN connection.
UNUSED_BROKER = "redis://127.0.0.1:9/0"
UNUSED_GEN = "http://127.0.0.1:9"
#: A target only a proxy could reach (``.invalid`` never resolves).
OUTSIDE = "outputs.invalid"


class Listener:
    """A real HTTP server on loopback that records every request line it gets. As a proxy it
    answers plain-HTTP requests itself (200 ``via proxy``) and refuses CONNECT tunnels (502)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes) -> None:
                owner.lines.append(self.requestline)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(200, b"via proxy")

            def do_POST(self) -> None:
                self._answer(200, b"via proxy")

            def do_CONNECT(self) -> None:
                self._answer(502, b"")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxy() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture
def internal() -> Iterator[Listener]:
    """An internal service the SSRF guard must keep the worker away from."""
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture
def environment_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A proxy set the usual way, in the process environment (as a cluster or a base image may)."""
    listener = Listener()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, listener.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield listener
    listener.close()


def http_session(tmp_path: Path, **overrides: Any) -> requests.Session:
    settings = unit_settings(UNUSED_BROKER, UNUSED_GEN, tmp_path, allow_private_urls=False, **overrides)
    return Resources(settings).http


def test_an_environment_proxy_does_not_route_around_the_connect_time_guard(
    tmp_path: Path, environment_proxy: Listener, internal: Listener
) -> None:
    session = http_session(tmp_path)

    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1"):
        session.get(f"http://127.0.0.1:{internal.port}/admin", timeout=5)

    assert environment_proxy.lines == [], "the environment's proxy was not used"
    assert internal.lines == []


def test_the_egress_proxy_setting_carries_downloads_and_webhooks(
    tmp_path: Path, proxy: Listener, environment_proxy: Listener
) -> None:
    session = http_session(tmp_path, egress_proxy=proxy.url)

    answer = session.get(f"http://{OUTSIDE}/outputs/j1.mp4", timeout=5)
    assert (answer.status_code, answer.text) == (200, "via proxy")
    with pytest.raises(requests.exceptions.ProxyError):
        session.get(f"https://{OUTSIDE}/outputs/j1.mp4", timeout=5)

    plain, tunnel = proxy.lines
    assert plain == f"GET http://{OUTSIDE}/outputs/j1.mp4 HTTP/1.1"
    assert tunnel.startswith(f"CONNECT {OUTSIDE}:443 "), "https goes through a tunnel to the target"
    assert environment_proxy.lines == []


def test_behind_the_egress_proxy_a_private_target_is_still_refused_before_the_request(
    tmp_path: Path, proxy: Listener, internal: Listener
) -> None:
    session = http_session(tmp_path, egress_proxy=proxy.url)

    with pytest.raises(UnsafeURL):
        post_webhook(
            session,
            f"http://127.0.0.1:{internal.port}/hooks",
            {"job_id": "j1"},
            msg_id="j1.outcome",
            secret="s",
            timeout=5,
            allow_private=False,
        )
    assert proxy.lines == [] and internal.lines == []


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:1080", "127.0.0.1:3128", "ftp://proxy:21"])
def test_an_egress_proxy_must_be_an_http_url(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="LIPSYNC_EGRESS_PROXY"):
        unit_settings(UNUSED_BROKER, UNUSED_GEN, tmp_path, egress_proxy=value)


def test_a_ca_bundle_from_the_environment_still_verifies_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ignoring the environment's proxies must not drop its CA bundle (a TLS-inspecting egress)."""
    bundle = tmp_path / "corporate-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert http_session(tmp_path).verify == str(bundle)
