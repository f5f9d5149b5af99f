"""What a failure payload may say about an unexpected error: its type, never its text.

The failure JSON goes to callers (callbacks, the result backend, Flower). An unexpected exception's
text can carry a signed URL or a local path, so it stays in the worker's log (with URL credentials
and query strings scrubbed) and the payload says only what kind of error it was.
"""

from __future__ import annotations

import logging

import pytest

from tests.unit.conftest import FakeClock
from tests.unit.jobs.builders import created
from worker.jobs.failures import failure_for
from worker.jobs.resources import Resources

TOKEN = "X-Amz-Signature=5ecret5ig"
RAW = (
    f"GET https://uploader:hunter2@cdn.example.com/outputs/j1.mp4?{TOKEN}&X-Amz-Credential=AKIA1 failed; "
    "see /srv/lipsync/private/scratch/state.json"
)


class Surprise(Exception):
    """An exception type no layer knows (a bug, or a library error nobody mapped)."""


def test_an_unexpected_error_keeps_its_type_and_loses_its_text(
    res: Resources, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    job = created(res)

    with caplog.at_level(logging.ERROR, logger="lipsync.failures"):
        failure = failure_for(Surprise(RAW), job=job, job_id=job.job_id, metadata={}, now=clock())

    assert (failure.status, failure.error_code) == ("failed", "internal_error")
    assert "Surprise" in failure.message
    for leaked in ("hunter2", "5ecret5ig", "AKIA1", "cdn.example.com", "/srv/lipsync"):
        assert leaked not in failure.message, leaked

    # The worker's log has what an operator needs, without the URL's credentials and query.
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    logged += caplog.text
    assert job.job_id in logged and "Surprise" in logged
    assert "cdn.example.com/outputs/j1.mp4" in logged and "/srv/lipsync/private/scratch" in logged
    for leaked in ("hunter2", "5ecret5ig", "AKIA1"):
        assert leaked not in logged, leaked
