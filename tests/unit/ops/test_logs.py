"""Short task lines: what a worker's INFO log keeps of a task's return value or failure."""

from __future__ import annotations

import logging

import pytest

from worker.errors import LipsyncJobFailed
from worker.ops.logs import ShortTaskLines, strip_url_queries, summarize

JOB = {
    "request": {"job_id": "j-1", "callback": {"webhook_url": "https://hooks.example/x?token=s3cret"}},
    "generation_id": "9001",
    "gen_status": "processing",
    "polls": 3,
    "drive": 2,
}


@pytest.mark.parametrize("value", [JOB, repr(JOB)], ids=["object", "celery's repr"])
def test_a_job_becomes_its_ids(value: object) -> None:
    assert summarize(value) == "job_id=j-1 generation_id=9001 gen_status=processing polls=3 drive=2"


def test_a_failure_keeps_its_status_and_code_not_its_metadata() -> None:
    failure = {
        "job_id": "j",
        "status": "failed",
        "error_code": "generation_failed",
        "metadata": {"a": "b" * 900},
    }
    assert (
        summarize(LipsyncJobFailed(failure))
        == "LipsyncJobFailed(job_id=j status=failed error_code=generation_failed)"
    )


def test_urls_lose_their_query_strings() -> None:
    assert (
        strip_url_queries("GET https://cdn/x.mp4?X-Amz-Signature=abc done") == "GET https://cdn/x.mp4?… done"
    )
    assert "abc" not in summarize(ValueError("https://cdn/x.mp4?sig=abc"))


def test_the_filter_shortens_celerys_success_line_at_info_and_not_at_debug() -> None:
    logger = logging.getLogger("celery.app.trace.test")
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "Task %(name)s succeeded: %(return_value)s",
        ({"name": "lipsync.poll", "return_value": repr(JOB)},),
        None,
    )
    ShortTaskLines().filter(record)
    assert record.getMessage() == "Task lipsync.poll succeeded: " + summarize(JOB)
    logger.setLevel(logging.DEBUG)
    try:
        full = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, "%(return_value)s", ({"return_value": repr(JOB)},), None
        )
        ShortTaskLines().filter(full)
        assert "s3cret" in full.getMessage()  # -l DEBUG sees everything
    finally:
        logger.setLevel(logging.NOTSET)
