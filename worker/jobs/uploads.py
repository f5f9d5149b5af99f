"""Sources given by URL in the ``autocontentengine`` dialect: uploaded to GEN first.

That body takes content resource ids only, so each ``video_url`` / ``audio_url`` is downloaded
(:mod:`worker.jobs.source_files`: through the egress session, the URL guard applies where the socket
opens) and uploaded to GEN as a content resource. Up to ``LIPSYNC_GEN_MULTIPART_MAX_BYTES`` (50 MiB,
GEN's limit for it) as one multipart ``POST /v1/content_resources``; larger files, up to 1 GiB, with
GEN's 3-step direct upload: ``POST /v1/direct_upload`` (the blob: name, size, MD5), a ``PUT`` of the
bytes, streamed from the temporary file, to the URL GEN hands out (storage, not GEN's API: the
egress session, without the API key), then ``POST /v1/content_resources`` naming the signed id.
Both are free. Larger sources are refused (``source_too_large``).

The job then names the new ids, and is recorded before the generate goes out, so a retried or
re-driven submit never uploads again nor changes the body behind its Idempotency-Key.
"""

from __future__ import annotations

from worker.gen.direct_upload import put_blob
from worker.gen.errors import GenBadResponse
from worker.gen.models import ContentResource
from worker.jobs.models import Job
from worker.jobs.resources import Resources
from worker.jobs.source_files import SourceFile, SourceTooLarge, download_source
from worker.output.urlguard import check_url

__all__ = ["SourceTooLarge", "needs_upload", "upload_sources"]


def needs_upload(job: Job, res: Resources) -> bool:
    return res.gen.dialect == "autocontentengine" and bool(job.request.video_url or job.request.audio_url)


def upload_sources(job: Job, res: Resources) -> Job:
    """``job`` with each URL side replaced by the id of its upload to GEN.

    Raises :class:`SourceTooLarge`; :class:`OutputError` (the download: retryable or not, as
    :func:`worker.retry.decide` says) and GEN's errors of the upload (its ``PUT`` included).
    """
    request = job.request
    update: dict[str, str | None] = {}
    for side in ("video", "audio"):
        url = getattr(request, f"{side}_url")
        if url is None:
            continue
        with download_source(url, side, res) as source:
            if source.size <= res.settings.gen_multipart_max_bytes:
                resource = res.gen.upload_content_resource(
                    source.name, source.read_all(), source.content_type
                )
            else:
                resource = _direct_upload(source, res)
        if resource.id is None:
            raise GenBadResponse("GEN's answer to the upload named no resource id", endpoint="upload")
        update[f"{side}_resource_id"] = str(resource.id)
        update[f"{side}_url"] = None
    return job.model_copy(update={"request": request.model_copy(update=update)})


def _direct_upload(source: SourceFile, res: Resources) -> ContentResource:
    """GEN's 3 steps for a file over the multipart limit; the bytes stream from ``source.file``."""
    blob = res.gen.create_direct_upload(
        file_name=source.name,
        byte_size=source.size,
        checksum=source.md5_base64,
        content_type=source.content_type,
    )
    s = res.settings
    # GEN's URL is checked as a source URL is (http(s), no credentials, a public address).
    check_url(blob.direct_upload.url, allow_private=s.allow_private_urls)
    source.file.seek(0)
    put_blob(
        res.http,
        blob.direct_upload,
        source.file,
        byte_size=source.size,
        timeout=(s.gen_connect_timeout, s.gen_read_timeout),
    )
    return res.gen.create_content_resource(blob.signed_id)
