"""Storage backends: the local directory, and S3 against moto's server on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.moto_s3 import AWS_ENV, moto_s3_server, s3_client
from worker.errors import ConfigurationError
from worker.jobs.resources import Resources
from worker.output.errors import OutputInvalid, StorageError
from worker.output.s3 import MISSING_BOTO3, S3Storage
from worker.output.storage import LocalStorage
from worker.retry import is_retryable
from worker.settings import Settings

VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"lipsync-bytes" * 100


def staged(storage: Any, data: bytes = VIDEO) -> Path:
    """A finished download, as worker.output.download leaves it in the staging directory: made by
    ``mkstemp`` (so ``-rw-------`` whatever the umask), written, closed."""
    staging: Path = storage.staging_dir()  # every backend's staging_dir() returns a Path
    staging.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".download-", suffix=".partial", dir=staging)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return Path(name)


# --------------------------------------------------------------------------------------------
# LocalStorage
# --------------------------------------------------------------------------------------------


def test_local_staging_dir_is_beside_the_outputs(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    assert storage.staging_dir() == (tmp_path / "out").resolve() / ".partial"


def test_local_publish_is_an_atomic_rename(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    tmp = staged(storage)
    inode = tmp.stat().st_ino
    published = storage.publish("job-1", tmp, content_type="video/mp4", sha256="ab" * 32)
    final = (tmp_path / "out").resolve() / "job-1.mp4"
    assert published.path == str(final)
    assert published.uri == final.as_uri()
    assert final.read_bytes() == VIDEO
    assert final.stat().st_ino == inode, "renamed into place, not copied"
    assert not tmp.exists()


def test_local_republish_replaces_the_same_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    first = storage.publish("job-2", staged(storage, b"first"), content_type="video/mp4")
    second = storage.publish("job-2", staged(storage, b"second"), content_type="video/mp4")
    assert first == second
    assert Path(second.path or "").read_bytes() == b"second"
    assert [p.name for p in storage.root.iterdir() if p.is_file()] == ["job-2.mp4"]
    assert list(storage.staging_dir().iterdir()) == []


@pytest.mark.parametrize("job_id", ["../escaped", "sub/dir", "/etc/passwd"])
def test_local_refuses_a_job_id_that_escapes_the_directory(tmp_path: Path, job_id: str) -> None:
    storage = LocalStorage(tmp_path / "out")
    tmp = staged(storage)
    with pytest.raises(OutputInvalid):
        storage.publish(job_id, tmp, content_type="video/mp4")
    assert not (tmp_path / "escaped.mp4").exists()


def test_local_publish_the_disk_refuses_is_a_retryable_storage_error_naming_the_directory(
    tmp_path: Path,
) -> None:
    """EISDIR (a directory sits under the output's name): a real OSError that root gets too."""
    storage = LocalStorage(tmp_path / "out")
    tmp = staged(storage)
    (storage.root / "job-5.mp4").mkdir()

    with pytest.raises(StorageError) as info:
        storage.publish("job-5", tmp, content_type="video/mp4")

    exc = info.value
    assert exc.retryable and is_retryable(exc)
    assert exc.error_code == "storage_unavailable"
    assert str(storage.root) in str(exc) and "Is a directory" in str(exc)
    assert not tmp.exists(), "the temp file is removed: the retry downloads again"


def test_local_storage_under_a_file_is_a_retryable_storage_error(tmp_path: Path) -> None:
    """ENOTDIR: the storage directory's parent is a file."""
    (tmp_path / "file").write_bytes(b"x")
    storage = LocalStorage(tmp_path / "file" / "out")
    tmp = tmp_path / "staged.partial"
    tmp.write_bytes(VIDEO)

    with pytest.raises(StorageError, match="Not a directory") as info:
        storage.publish("job-6", tmp, content_type="video/mp4")
    assert str(tmp_path / "file") in str(info.value)


# --------------------------------------------------------------------------------------------
# S3Storage (moto server mode)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials only: no profile, shared config or instance metadata of this machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: None) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def make_s3(tmp_path: Path, endpoint: str, bucket: str, **kwargs: Any) -> S3Storage:
    return S3Storage(
        bucket=bucket, staging_root=tmp_path / "out", endpoint_url=endpoint, region="us-east-1", **kwargs
    )


def test_s3_staging_dir_is_under_the_storage_dir(tmp_path: Path, aws_env: None) -> None:
    storage = S3Storage(bucket="b", staging_root=tmp_path / "out")
    assert storage.staging_dir() == (tmp_path / "out").resolve() / ".partial"


def test_s3_publish_uploads_with_content_type_and_sha256(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    storage = make_s3(tmp_path, s3_endpoint, bucket)
    tmp = staged(storage)
    digest = hashlib.sha256(VIDEO).hexdigest()
    published = storage.publish("job-1", tmp, content_type="video/mp4", sha256=digest)

    assert published.uri == f"s3://{bucket}/lipsync/job-1.mp4"
    assert published.path is None
    assert not tmp.exists()
    obj = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="lipsync/job-1.mp4")
    assert obj["Body"].read() == VIDEO
    assert obj["ContentType"] == "video/mp4"
    assert obj["Metadata"] == {"sha256": digest}


def test_s3_republish_overwrites_the_same_key(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    storage = make_s3(tmp_path, s3_endpoint, bucket, prefix="out/")
    first = storage.publish("job-2", staged(storage, b"first"), content_type="video/mp4")
    second = storage.publish("job-2", staged(storage, b"second"), content_type="video/mp4")
    assert first == second == storage.publish("job-2", staged(storage, b"second"), content_type="video/mp4")
    client = s3_client(s3_endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["out/job-2.mp4"]
    assert client.get_object(Bucket=bucket, Key="out/job-2.mp4")["Body"].read() == b"second"
    assert list(storage.staging_dir().iterdir()) == []


def test_s3_big_file_goes_up_in_parts(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    mib = 1024 * 1024
    storage = make_s3(tmp_path, s3_endpoint, bucket, multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    data = os.urandom(11 * mib)
    digest = hashlib.sha256(data).hexdigest()
    storage.publish("job-big", staged(storage, data), content_type="video/mp4", sha256=digest)
    obj = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="lipsync/job-big.mp4")
    assert obj["ETag"].strip('"').endswith("-3"), "a multipart upload of three parts"
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == digest
    assert obj["ContentType"] == "video/mp4"
    assert obj["Metadata"] == {"sha256": digest}


def test_s3_reuses_one_client_per_process(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    storage = make_s3(tmp_path, s3_endpoint, bucket)
    storage.publish("job-a", staged(storage), content_type="video/mp4")
    client = storage._client_and_config()[0]
    storage.publish("job-b", staged(storage), content_type="video/mp4")
    assert storage._client_and_config()[0] is client
    assert client.meta.config.connect_timeout == 5
    assert client.meta.config.read_timeout == 60
    # botocore's ``max_attempts`` counts retries: three retries, four attempts in all.
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 4}


def test_s3_missing_bucket_is_a_retryable_storage_error(
    tmp_path: Path, s3_endpoint: str, aws_env: None
) -> None:
    storage = make_s3(tmp_path, s3_endpoint, f"missing-{uuid.uuid4().hex[:12]}")
    tmp = staged(storage)
    with pytest.raises(StorageError) as exc_info:
        storage.publish("job-3", tmp, content_type="video/mp4")
    exc = exc_info.value
    assert exc.retryable and is_retryable(exc)
    assert exc.error_code == "storage_unavailable"
    assert "NoSuchBucket" in str(exc)
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in str(exc)
    assert not tmp.exists(), "the temp file is removed when the upload fails"


def test_s3_unreachable_endpoint_is_a_retryable_storage_error(tmp_path: Path, aws_env: None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: every connection is refused at once.
    storage = make_s3(tmp_path, f"http://127.0.0.1:{port}", "bucket")
    tmp = staged(storage)
    with pytest.raises(StorageError) as exc_info:
        storage.publish("job-4", tmp, content_type="video/mp4")
    assert exc_info.value.retryable
    assert "EndpointConnectionError" in str(exc_info.value)
    assert not tmp.exists()


def test_s3_without_boto3_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigurationError) as exc_info:
        S3Storage(bucket="b", staging_root=tmp_path)
    assert str(exc_info.value) == MISSING_BOTO3
    assert "lipsync-worker[s3]" in str(exc_info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"bucket": None}, "LIPSYNC_S3_BUCKET"), ({"bucket": "b", "prefix": "/abs/"}, "LIPSYNC_S3_PREFIX")],
)
def test_s3_settings_are_checked_at_construction(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        S3Storage(staging_root=tmp_path, **kwargs)


def test_resources_pick_the_configured_backend(tmp_path: Path, aws_env: None) -> None:
    local = Resources(Settings.from_environ({"LIPSYNC_STORAGE_DIR": str(tmp_path)})).storage
    assert isinstance(local, LocalStorage)
    s3_settings = Settings.from_environ(
        {
            "LIPSYNC_STORAGE_BACKEND": "s3",
            "LIPSYNC_STORAGE_DIR": str(tmp_path),
            "LIPSYNC_S3_BUCKET": "media",
            "LIPSYNC_S3_PREFIX": "videos/",
            "LIPSYNC_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "LIPSYNC_S3_REGION": "eu-west-1",
        }
    )
    s3 = Resources(s3_settings).storage
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "media",
        "videos/",
        "http://127.0.0.1:9",
        "eu-west-1",
    )
    assert s3.staging_dir() == tmp_path.resolve() / ".partial"
    assert s3.uri_for("job-9") == "s3://media/videos/job-9.mp4"
    with pytest.raises(ConfigurationError, match="LIPSYNC_S3_BUCKET"):
        _ = Resources(Settings.from_environ({"LIPSYNC_STORAGE_BACKEND": "s3"})).storage


def test_a_published_output_is_readable_by_a_consumer_under_another_uid(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    download = staged(storage)
    assert stat.S_IMODE(os.stat(download).st_mode) == 0o600  # as mkstemp leaves it
    published = storage.publish("j-mode", download, content_type="video/mp4")
    assert published.path is not None
    assert stat.S_IMODE(os.stat(published.path).st_mode) == 0o644


def test_the_output_mode_is_a_setting(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path / "out", output_file_mode="0640")
    storage = Resources(settings).storage
    published = storage.publish("j-mode", staged(storage), content_type="video/mp4")
    assert published.path is not None
    assert stat.S_IMODE(os.stat(published.path).st_mode) == 0o640
    with pytest.raises(ValueError, match="output_file_mode"):
        Settings(output_file_mode="rw-r--r--")
