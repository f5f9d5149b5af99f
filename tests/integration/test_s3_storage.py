"""The s3 storage backend end to end: a real worker process uploads the output to moto's S3 server."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.integration.test_chain import RESULT_TIMEOUT, request
from tests.moto_s3 import AWS_ENV, moto_s3_server, s3_client
from worker.enqueue import enqueue

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"lipsync-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_cluster(make_cluster: Any, s3_endpoint: str, bucket: str, tmp_path: Any) -> Cluster:
    cluster: Cluster = make_cluster(
        LIPSYNC_STORAGE_BACKEND="s3",
        LIPSYNC_S3_BUCKET=bucket,
        LIPSYNC_S3_ENDPOINT_URL=s3_endpoint,
        LIPSYNC_S3_REGION="us-east-1",
        # Only the dummy credentials: nothing from this machine's AWS profile or instance role.
        **AWS_ENV,
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    cluster.start_worker()
    return cluster


def test_output_is_uploaded_to_the_bucket(
    s3_cluster: Cluster, simulator: Any, bucket: str, s3_endpoint: str
) -> None:
    req = request()
    result = enqueue(req, app=s3_cluster.app()).get(timeout=RESULT_TIMEOUT)

    assert result["status"] == "completed"
    output = result["output"]
    key = f"lipsync/{req['job_id']}.mp4"
    assert output["uri"] == f"s3://{bucket}/{key}"
    assert output["path"] is None
    served = simulator.output_bytes(result["generation_id"])
    obj = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)
    body = obj["Body"].read()
    assert body == served
    digest = hashlib.sha256(served).hexdigest()
    assert output["sha256"] == digest
    assert obj["ContentType"] == output["content_type"] == "video/mp4"
    # The object carries its own digest (x-amz-meta-sha256, written by worker.output.s3), so a
    # reader can check what it downloads without the job's result.
    assert obj["Metadata"].get("sha256") == digest, obj["Metadata"]
    staging = s3_cluster.storage / ".partial"
    assert not list(staging.glob("*")), "no temp file left in the staging dir"
    assert not list(s3_cluster.storage.glob("*.mp4")), "nothing published to the local directory"
    logs = "".join(w.log() for w in s3_cluster.workers)
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in logs
