"""A request's sources given by URL (``video_url`` / ``audio_url``): what this worker can send.

The ``vidsheet`` dialect sends a URL to GEN as it is (GEN fetches it); the URL must pass the URL
guard all the same (http(s), no credentials, a public address unless LIPSYNC_ALLOW_PRIVATE_URLS),
so a caller cannot make GEN, or us, fetch from inside the network. The ``autocontentengine``
dialect takes content resource ids only: the submit uploads URL sources to GEN first
(:mod:`worker.jobs.uploads`), unless LIPSYNC_GEN_UPLOAD_SOURCES is off, when such a request is
refused up front rather than failing at GEN.
"""

from __future__ import annotations

from collections.abc import Mapping

from worker.errors import RequestInvalid
from worker.jobs.models import LipsyncRequest
from worker.output.errors import HostUnresolved, UnsafeURL
from worker.output.urlguard import check_url
from worker.settings import Settings


def refuse_unusable_sources(request: LipsyncRequest, settings: Settings) -> None:
    """Raises :class:`RequestInvalid` naming each URL source this worker cannot send."""
    refuse_unusable_urls({"video_url": request.video_url, "audio_url": request.audio_url}, settings)


def refuse_unusable_urls(urls: Mapping[str, str | None], settings: Settings) -> None:
    """``urls``: field name (``video_url``...) -> URL or None. Raises :class:`RequestInvalid`
    naming each URL this worker cannot send."""
    errors = []
    for field, url in urls.items():
        if url is None:
            continue
        side = field.removesuffix("_url")
        if settings.gen_dialect == "autocontentengine" and not settings.gen_upload_sources:
            message = (
                f"LIPSYNC_GEN_DIALECT=autocontentengine takes content resource ids and uploading URLs to "
                f"GEN is off (LIPSYNC_GEN_UPLOAD_SOURCES=false): give {side}_resource_id"
            )
            errors.append({"field": field, "message": message})
            continue
        try:
            check_url(url, allow_private=settings.allow_private_urls)
        except HostUnresolved:
            pass  # GEN fetches it, later: a name that does not resolve here now is GEN's to judge
        except UnsafeURL as exc:
            errors.append({"field": field, "message": f"refused by the URL guard: {exc}"})
    if errors:
        raise RequestInvalid(errors)
