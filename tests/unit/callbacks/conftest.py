"""A real webhook receiver for the callback tests (verifies every signature it gets)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.conftest import WEBHOOK_SECRET
from tests.webhook_receiver import WebhookReceiver


@pytest.fixture(scope="package")
def _receiver() -> Iterator[WebhookReceiver]:
    # One for all the callback tests: closing one takes half a second (serve_forever polls that often).
    rx = WebhookReceiver(secret=WEBHOOK_SECRET)
    yield rx
    rx.close()


@pytest.fixture
def receiver(_receiver: WebhookReceiver) -> WebhookReceiver:
    """The receiver, answering 204 to verified webhooks, with nothing received yet."""
    _receiver.reset()
    return _receiver
