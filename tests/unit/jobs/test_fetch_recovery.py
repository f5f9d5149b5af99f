"""The fetch step recovers from what heals by itself: a DNS blip on the output's host, and a local
storage failure (a full disk, a directory that is not one). Both come back as ``Again`` with the
normal bounded backoff, and only when the retries are spent does the job fail, with a code that
says what failed: ``gen_unavailable`` for the host, ``storage_unavailable`` naming the directory
for the disk. Real Redis, the GEN simulator over HTTP, a real directory.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gensim import GenSimulator
from tests.unit.conftest import DURATIONS, FakeClock, unit_settings
from tests.unit.jobs.builders import submitted
from worker.jobs.errors import UpstreamUnavailable
from worker.jobs.failures import failure_for
from worker.jobs.models import Job, LipsyncResult
from worker.jobs.resources import Resources
from worker.jobs.steps import Again, fetch, poll
from worker.output.errors import StorageError

BLIP_HOST = "cdn.blip.example"

ResFactory = Callable[..., Resources]


@pytest.fixture
def make_res(redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock) -> Iterator[ResFactory]:
    made: list[Resources] = []

    def build(**overrides: Any) -> Resources:
        values: dict[str, Any] = {"storage_dir": tmp_path / "outputs", **overrides}
        storage = values.pop("storage_dir")
        made.append(Resources(unit_settings(redis_url, sim.base_url, storage, **values), clock=clock))
        return made[-1]

    yield build
    for resources in made:
        resources.redis.close()


def completed(res: Resources, clock: FakeClock) -> Job:
    job = submitted(res)
    clock.advance(DURATIONS["gen"] + 1)
    done = poll(job, res)
    assert isinstance(done, Job) and done.output_resource is not None
    return done


def as_again(outcome: object) -> Again:
    assert isinstance(outcome, Again), outcome
    return outcome


def failure_of(exc: BaseException, job: Job, clock: FakeClock) -> dict[str, Any]:
    return failure_for(exc, job=job, job_id=job.job_id, metadata={}, now=clock()).model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# a DNS blip on the output's host
# --------------------------------------------------------------------------------------------


@pytest.fixture
def dns_blip(monkeypatch: pytest.MonkeyPatch) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def blip(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == BLIP_HOST:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", blip)


def on_blip_host(job: Job) -> Job:
    """The job as if GEN had listed its output on a CDN whose name does not resolve right now."""
    assert job.output_resource is not None
    moved = job.output_resource.model_copy(update={"url": f"https://{BLIP_HOST}/outputs/{job.job_id}.mp4"})
    return job.model_copy(update={"output_resource": moved})


def test_a_dns_blip_on_the_output_host_is_retried_not_an_unsafe_url(
    make_res: ResFactory, clock: FakeClock, dns_blip: None
) -> None:
    res = make_res(allow_private_urls=False, max_transient_retries=2)
    job = on_blip_host(completed(res, clock))

    again = as_again(fetch(job, res))
    assert again.job.step_retries == 1
    record = res.jobs.get(job.job_id)
    assert record is not None and record.last_error is not None and BLIP_HOST in record.last_error
    again = as_again(fetch(again.job, res))

    # Still unresolved after the policy's retries: the host stayed unavailable (not "unsafe").
    with pytest.raises(UpstreamUnavailable) as info:
        fetch(again.job, res)
    failure = failure_of(info.value, again.job, clock)
    assert (failure["status"], failure["error_code"]) == ("failed", "gen_unavailable")
    assert BLIP_HOST in failure["message"] and "3 attempts" in failure["message"]


# --------------------------------------------------------------------------------------------
# local storage fails
# --------------------------------------------------------------------------------------------


def test_a_storage_directory_that_cannot_be_created_is_a_retryable_storage_error(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock, tmp_path: Path
) -> None:
    """ENOTDIR (a file where a directory should be) stands in for any OSError of the disk: it is
    real, and root (which ignores permissions) gets it too."""
    in_the_way = tmp_path / "not-a-directory"
    in_the_way.write_text("a file where the storage directory's parent should be")
    res = make_res(storage_dir=in_the_way / "outputs", max_transient_retries=1)
    job = completed(res, clock)

    again = as_again(fetch(job, res))

    assert again.job.step_retries == 1
    record = res.jobs.get(job.job_id)
    assert record is not None and record.last_error is not None
    assert str(in_the_way) in record.last_error, "the error names the directory"

    with pytest.raises(UpstreamUnavailable) as info:
        fetch(again.job, res)
    assert isinstance(info.value.__cause__, StorageError)
    failure = failure_of(info.value, again.job, clock)
    assert (failure["status"], failure["error_code"]) == ("failed", "storage_unavailable")
    assert str(in_the_way) in failure["message"] and "Not a directory" in failure["message"]
    assert sim.stats()["counts"]["cdn"] == 0, "nothing was downloaded into a directory that is not one"


def test_a_publish_the_disk_refuses_is_retried_and_leaves_no_temp_file(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock, tmp_path: Path
) -> None:
    """EISDIR: something else sits under the output's name. The downloaded temp file is removed (the
    retry downloads again), and once the way is clear the retry publishes."""
    res = make_res()
    job = completed(res, clock)
    blocker = (tmp_path / "outputs" / f"{job.job_id}.mp4").resolve()
    blocker.mkdir(parents=True)

    again = as_again(fetch(job, res))

    record = res.jobs.get(job.job_id)
    assert record is not None and record.last_error is not None
    assert str(blocker.parent) in record.last_error
    assert list(res.storage.staging_dir().iterdir()) == [], "the temp file is not left behind"

    blocker.rmdir()
    clock.advance(again.countdown)
    result = fetch(again.job, res)
    assert isinstance(result, LipsyncResult)
    assert Path(str(result.output.path)).read_bytes() == sim.output_bytes(str(job.generation_id))
    assert sim.stats()["counts"]["cdn"] == 2
