"""What can go wrong fetching or storing an output video. ``error_code`` goes into the failure JSON."""

from __future__ import annotations

from worker.errors import LipsyncError


class OutputError(LipsyncError):
    """Fetching or storing the output video went wrong."""

    error_code: str = "output_error"


class OutputDownloadError(OutputError):
    """The download broke off (reset, short body, timeout, 5xx from the CDN). Retryable."""

    retryable = True
    error_code = "output_download_failed"


class StorageError(OutputError):
    """Publishing to the storage backend failed (unreachable, refused, upload broke off). Retryable."""

    retryable = True
    error_code = "storage_unavailable"


class OutputTooLarge(OutputError):
    """The output is bigger than ``LIPSYNC_MAX_OUTPUT_BYTES``."""

    error_code = "output_too_large"


class OutputInvalid(OutputError):
    """The output is not a video (wrong content type, empty, missing from the generation)."""

    error_code = "output_invalid"


class UnsafeURL(OutputError):
    """A URL points somewhere we refuse to connect to (not http(s), or a private address). Final."""

    error_code = "unsafe_url"


#: What an operator needs to read next to "resolves to a private address": the setting that allows
#: it, and when that is right.
PRIVATE_URLS_HINT = (
    "set LIPSYNC_ALLOW_PRIVATE_URLS=true only where private addresses are expected "
    "(a GEN simulator, an in-cluster receiver); it is the SSRF guard"
)


def private_address(host: str, address: object) -> UnsafeURL:
    """The error for a host that resolves to a non-public address, naming the setting."""
    return UnsafeURL(f"host {host!r} resolves to non-public address {address}; {PRIVATE_URLS_HINT}")


class HostUnresolved(OutputError):
    """The URL's host name did not resolve just now. Retryable: a DNS blip says nothing about where
    the host points, and only an address in a non-public range makes a URL unsafe."""

    retryable = True
    error_code = "host_unresolved"
