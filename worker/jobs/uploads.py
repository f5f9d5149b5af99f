"""Sources given by URL in the ``autocontentengine`` dialect: uploaded to GEN first.

That body takes content resource ids only, so each ``video_url`` / ``audio_url`` is downloaded
(through the egress session: the URL guard applies where the socket opens) and uploaded to GEN as a
content resource (``POST /v1/content_resources``, multipart, free). The job then names the new ids,
and is recorded before the generate goes out, so a retried or re-driven submit never uploads again
nor changes the body behind its Idempotency-Key. Files over :data:`MULTIPART_LIMIT` would need GEN's
direct upload, which is not built: such a job is refused (``source_too_large``).
"""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

import requests

from worker.gen.errors import GenBadResponse
from worker.jobs.errors import JobError
from worker.jobs.models import Job
from worker.jobs.resources import Resources
from worker.output.errors import OutputDownloadError, OutputError, OutputInvalid
from worker.output.urlguard import check_url

#: GEN's multipart upload takes files up to 50 MB; bigger ones go through its direct upload.
MULTIPART_LIMIT = 50 * 1024 * 1024
_CHUNK = 256 * 1024
_FALLBACK_TYPES = {"video": "video/mp4", "audio": "audio/mpeg"}


class SourceTooLarge(JobError):
    """A source URL's file is larger than GEN's multipart upload takes."""

    status = "rejected"
    error_code = "source_too_large"


def needs_upload(job: Job, res: Resources) -> bool:
    return res.gen.dialect == "autocontentengine" and bool(job.request.video_url or job.request.audio_url)


def upload_sources(job: Job, res: Resources) -> Job:
    """``job`` with each URL side replaced by the id of its upload to GEN.

    Raises :class:`SourceTooLarge`; :class:`OutputError` (the download: retryable or not, as
    :func:`worker.retry.decide` says) and GEN's errors of the upload.
    """
    request = job.request
    update: dict[str, str | None] = {}
    for side in ("video", "audio"):
        url = getattr(request, f"{side}_url")
        if url is None:
            continue
        file_name, content_type, data = _fetch(url, side, res)
        resource = res.gen.upload_content_resource(file_name, data, content_type)
        if resource.id is None:
            raise GenBadResponse(
                "GEN's answer to the upload named no resource id", endpoint="upload_content_resource"
            )
        update[f"{side}_resource_id"] = str(resource.id)
        update[f"{side}_url"] = None
    return job.model_copy(update={"request": request.model_copy(update=update)})


def _fetch(url: str, side: str, res: Resources) -> tuple[str, str, bytes]:
    s = res.settings
    check_url(url, allow_private=s.allow_private_urls)
    try:
        timeout = (s.gen_connect_timeout, s.gen_read_timeout)
        with res.http.get(url, stream=True, timeout=timeout, allow_redirects=False) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise OutputDownloadError(f"the {side} source answered HTTP {response.status_code}")
            if response.status_code >= 300:
                # (Redirects are not followed: each hop would need the URL guard.)
                raise OutputInvalid(f"the {side} source answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MULTIPART_LIMIT:
                raise SourceTooLarge(_too_large(side))
            body = bytearray()
            for chunk in response.iter_content(chunk_size=_CHUNK):
                body += chunk
                if len(body) > MULTIPART_LIMIT:
                    raise SourceTooLarge(_too_large(side))
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    except OutputError:
        raise
    except requests.RequestException as exc:
        raise OutputDownloadError(f"downloading the {side} source failed: {type(exc).__name__}") from None
    if not body:
        raise OutputInvalid(f"the {side} source is empty")
    if not content_type.startswith(side + "/"):
        content_type = _FALLBACK_TYPES[side]
    name = posixpath.basename(urlsplit(url).path) or side
    return name, content_type, bytes(body)


def _too_large(side: str) -> str:
    return (
        f"the {side} source is larger than GEN's multipart upload takes ({MULTIPART_LIMIT // 2**20} MB);"
        " GEN's direct upload is not supported: give a content resource id"
    )
