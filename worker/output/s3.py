"""S3-compatible object storage (AWS S3, MinIO, R2, moto...): the ``s3`` extra.

Downloads are staged on local disk (``<storage_dir>/.partial``), hashed, and then uploaded as
``<prefix><job_id>.mp4``; the temp file is removed whether the upload worked or not. A re-run for the
same job overwrites the same key with the same bytes, so publishing stays idempotent.

boto3 is imported lazily so that the local backend needs none of it. Credentials come only from
boto3's standard chain (``AWS_*`` environment variables, shared config, instance roles), never from
our settings, and nothing here logs them.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from worker.errors import ConfigurationError
from worker.output.errors import OutputInvalid, StorageError
from worker.output.storage import PARTIAL_DIR, Published

log = logging.getLogger(__name__)

MISSING_BOTO3 = "LIPSYNC_STORAGE_BACKEND=s3 needs boto3: pip install 'lipsync-worker[s3]'"

_MIB = 1024 * 1024


class S3Storage:
    """Outputs as ``s3://<bucket>/<prefix><job_id>.mp4``, uploaded from a staged temp file."""

    def __init__(
        self,
        *,
        bucket: str | None,
        staging_root: Path,
        prefix: str = "lipsync/",
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = 16 * _MIB,
        multipart_chunksize: int = 16 * _MIB,
        max_concurrency: int = 4,
    ) -> None:
        if not bucket:
            raise ConfigurationError("LIPSYNC_STORAGE_BACKEND=s3 needs LIPSYNC_S3_BUCKET")
        if prefix.startswith("/"):
            raise ConfigurationError("LIPSYNC_S3_PREFIX must not start with '/' (keys are relative)")
        _import("boto3")  # fail at start-up, not on the first finished job
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.staging_root = staging_root.resolve()
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self._client: tuple[int, Any, Any] | None = None  # (pid, client, TransferConfig)

    def staging_dir(self) -> Path:
        return self.staging_root / PARTIAL_DIR

    def key_for(self, job_id: str) -> str:
        # Job ids are validated to a safe character set; this is the second lock on the door.
        if not job_id or "/" in job_id or "\\" in job_id or job_id in (".", ".."):
            raise OutputInvalid(f"job id {job_id!r} is not usable as an object name")
        return f"{self.prefix}{job_id}.mp4"

    def uri_for(self, job_id: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(job_id)}"

    def publish(
        self, job_id: str, tmp_path: Path, *, content_type: str, sha256: str | None = None
    ) -> Published:
        try:
            key = self.key_for(job_id)
            client, transfer_config = self._client_and_config()
            extra_args: dict[str, Any] = {"ContentType": content_type}
            if sha256 is not None:
                extra_args["Metadata"] = {"sha256": sha256}
            try:
                client.upload_file(
                    str(tmp_path), self.bucket, key, ExtraArgs=extra_args, Config=transfer_config
                )
            except _upload_errors() as exc:
                raise StorageError(f"upload to s3://{self.bucket}/{key} failed: {_describe(exc)}") from None
        finally:
            tmp_path.unlink(missing_ok=True)
        log.debug("published job %s to s3://%s/%s", job_id, self.bucket, key)
        return Published(uri=f"s3://{self.bucket}/{key}", path=None)

    def _client_and_config(self) -> tuple[Any, Any]:
        """The S3 client, built once per process (a client must not cross a fork)."""
        pid = os.getpid()
        if self._client is None or self._client[0] != pid:
            boto3 = _import("boto3")
            botocore_config = _import("botocore.config")
            transfer = _import("boto3.s3.transfer")
            config = botocore_config.Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            session = boto3.session.Session()
            client = session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
            transfer_config = transfer.TransferConfig(
                multipart_threshold=self.multipart_threshold,
                multipart_chunksize=self.multipart_chunksize,
                max_concurrency=self.max_concurrency,
            )
            self._client = (pid, client, transfer_config)
        return self._client[1], self._client[2]


def _import(name: str) -> Any:
    """Import a boto3/botocore module, or say which extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigurationError(MISSING_BOTO3) from None


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: S3's refusals, transport failures, and boto3's upload wrapper.

    ``NoCredentialsError`` is a ``BotoCoreError`` too: with no credentials the upload can only
    fail, but the job retries a bounded number of times and then fails with this message.
    """
    exceptions = _import("botocore.exceptions")
    boto3_exceptions = _import("boto3.exceptions")
    return (exceptions.ClientError, exceptions.BotoCoreError, boto3_exceptions.S3UploadFailedError)


def _describe(exc: BaseException) -> str:
    """A short reason without request details (S3's error code and HTTP status, or the error type)."""
    exceptions = _import("botocore.exceptions")
    cause: BaseException = exc
    # boto3 wraps a ClientError from the transfer in S3UploadFailedError (as its context).
    if not isinstance(cause, exceptions.ClientError) and isinstance(exc.__context__, exceptions.ClientError):
        cause = exc.__context__
    if isinstance(cause, exceptions.ClientError):
        response: dict[str, Any] = getattr(cause, "response", {}) or {}
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code") or "error"
        return f"{code} (HTTP {status})" if status else str(code)
    return type(cause).__name__
