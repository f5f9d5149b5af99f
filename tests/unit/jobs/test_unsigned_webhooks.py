"""A webhook callback is refused where the request is validated unless webhooks can be signed
(``LIPSYNC_WEBHOOK_SECRET``) or unsigned ones are allowed explicitly
(``LIPSYNC_ALLOW_UNSIGNED_WEBHOOKS=true``): receivers must be able to trust what they get, and an
unset secret must not silently turn signing off.
"""

from __future__ import annotations

import pytest

from tests.unit.conftest import ResFactory, queued
from tests.unit.jobs.builders import TASK_CALLBACK, request
from worker.app import create_app
from worker.celery_queue import CeleryQueue
from worker.enqueue import enqueue
from worker.errors import RequestInvalid
from worker.jobs.failures import reject
from worker.jobs.steps import create
from worker.names import ALL_QUEUES

WEBHOOK = {"webhook_url": "https://pipeline.example.com/hooks/lipsync"}


def refused_fields(info: pytest.ExceptionInfo[RequestInvalid]) -> list[str]:
    return [error["field"] for error in info.value.errors]


@pytest.mark.parametrize("secret", [None, ""])
def test_a_webhook_callback_without_a_secret_is_refused_naming_the_field(
    make_res: ResFactory, secret: str | None
) -> None:
    res = make_res(webhook_secret=secret)

    with pytest.raises(RequestInvalid) as info:
        create(request("j1", callback=WEBHOOK), task_id="t1", res=res)

    assert refused_fields(info) == ["callback.webhook_url"]
    (error,) = info.value.errors
    assert "LIPSYNC_WEBHOOK_SECRET" in error["message"]
    assert "LIPSYNC_ALLOW_UNSIGNED_WEBHOOKS" in error["message"]
    assert res.jobs.get("j1") is None, "nothing was recorded"


def test_a_webhook_callback_is_accepted_with_a_secret_or_when_unsigned_ones_are_allowed(
    make_res: ResFactory,
) -> None:
    signed = make_res()  # unit_settings sets a secret
    assert create(request("j1", callback=WEBHOOK), task_id="t1", res=signed).created
    unsigned = make_res(webhook_secret=None, allow_unsigned_webhooks=True)
    assert create(request("j2", callback=WEBHOOK), task_id="t2", res=unsigned).created


def test_a_task_callback_needs_no_secret(make_res: ResFactory) -> None:
    res = make_res(webhook_secret=None)
    assert create(request("j1", callback=TASK_CALLBACK), task_id="t1", res=res).created


def test_the_python_helper_refuses_before_recording_or_sending_anything(make_res: ResFactory) -> None:
    res = make_res(webhook_secret=None)
    app = create_app(res.settings)

    with pytest.raises(RequestInvalid) as info:
        enqueue(request("j1", callback={**WEBHOOK, **TASK_CALLBACK}), app=app)

    assert refused_fields(info) == ["callback.webhook_url"]
    assert res.jobs.get("j1") is None
    assert [m for name in ALL_QUEUES for m in queued(res, name)] == []


def test_a_raw_send_task_is_rejected_at_task_start_and_nothing_goes_out_unsigned(
    make_res: ResFactory,
) -> None:
    """``lipsync.run`` validates with create too; its refusal is recorded like any invalid request."""
    res = make_res(webhook_secret=None)
    queue = CeleryQueue(create_app(res.settings))
    raw = request("j1", callback=WEBHOOK)

    with pytest.raises(RequestInvalid) as info:
        create(raw, task_id="t-run-1", res=res)
    failure = reject(queue, res, raw, info.value, task_id="t-run-1")

    assert (failure["status"], failure["error_code"]) == ("rejected", "validation_error")
    assert [e["field"] for e in failure["errors"]] == ["callback.webhook_url"]
