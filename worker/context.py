"""Per-process resources: one GEN client, one HTTP session, one Redis connection pool.

Built lazily and keyed by process id, because Celery's prefork pool forks children after the
parent imported everything: a socket inherited across fork would be shared by two processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
import requests

from worker import metrics
from worker.delivery import attempt_time_limits
from worker.download import DownloadLimits
from worker.gen_client import GenClient
from worker.jobstore import JobStore
from worker.outbox import Outbox
from worker.ratelimit import Budget, FleetRateLimiter
from worker.safe_http import GuardedAdapter
from worker.settings import Settings, get_settings
from worker.storage import LocalStorage, Storage
from worker.storage_s3 import S3Storage

USER_AGENT = "lipsync-worker/0.1 (+python-requests)"


@dataclass
class Resources:
    settings: Settings

    @cached_property
    def gen(self) -> GenClient:
        redis_client = self.redis

        def observe(endpoint: str, status: int | None, seconds: float) -> None:
            metrics.record_gen_call(redis_client, endpoint=endpoint, status=status, seconds=seconds)

        return GenClient.from_settings(self.settings, on_call=observe)

    @cached_property
    def http(self) -> requests.Session:
        """Session for downloads and webhooks (not GEN: that one carries the API key)."""
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
        if not self.settings.allow_private_urls:
            # Check addresses where sockets are opened too, not only before the request (DNS
            # rebinding); output and webhook URLs come from outside.
            guarded = GuardedAdapter()
            session.mount("http://", guarded)
            session.mount("https://", guarded)
        return session

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.settings.effective_redis_url,
            socket_connect_timeout=5,
            socket_timeout=10,
            health_check_interval=30,
            retry_on_timeout=True,
        )

    @cached_property
    def limiter(self) -> FleetRateLimiter:
        """The fleet-wide GEN rate limit, shared through this process's Redis pool."""
        s = self.settings
        limits: dict[Budget, int] = {"generate": s.gen_generate_rate, "status": s.gen_status_rate}
        return FleetRateLimiter(self.redis, limits=limits, window=s.gen_rate_window)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.redis, ttl=int(self.settings.job_timeout) + self.settings.result_ttl)

    @cached_property
    def outbox(self) -> Outbox:
        """Undelivered webhooks. While the fleet runs, an entry is written at least once per
        longest gap (a queued message, a retry countdown, an attempt; then the sweeper); with the
        fleet down, an owed webhook survives LIPSYNC_RESULT_TTL."""
        s = self.settings
        _, attempt_limit = attempt_time_limits(s.webhook_timeout)
        longest_gap = max(
            s.queued_recovery,
            max(s.webhook_retry_delays, default=0.0) + s.recovery_grace,
            attempt_limit + s.recovery_grace,
        )
        return Outbox(self.redis, ttl=s.result_ttl + int(longest_gap + s.sweep_interval))

    @cached_property
    def storage(self) -> Storage:
        """The output backend: a local directory, or S3-compatible object storage (``s3`` extra)."""
        s = self.settings
        if s.storage_backend == "s3":
            return S3Storage(
                bucket=s.s3_bucket,
                prefix=s.s3_prefix,
                staging_root=s.storage_dir,
                endpoint_url=s.s3_endpoint_url,
                region=s.s3_region,
            )
        return LocalStorage(s.storage_dir)

    @property
    def download_limits(self) -> DownloadLimits:
        s = self.settings
        return DownloadLimits(
            max_bytes=s.max_output_bytes,
            total_timeout=s.download_timeout,
            connect_timeout=s.gen_connect_timeout,
            read_timeout=s.gen_read_timeout,
            allow_private=s.allow_private_urls,
        )


_resources: tuple[int, Resources] | None = None


def resources() -> Resources:
    """This process's resources (rebuilt in a forked child)."""
    global _resources
    pid = os.getpid()
    if _resources is None or _resources[0] != pid:
        _resources = (pid, Resources(get_settings()))
    return _resources[1]


def resources_of(app: Any) -> Resources:
    """The resources of a Celery app made by :func:`worker.app.create_app` with its own settings
    (a producer can hold apps for several deployments), per process like :func:`resources`."""
    settings = getattr(app, "lipsync_settings", None)
    if settings is None:
        return resources()
    cached: tuple[int, Resources] | None = getattr(app, "_lipsync_resources", None)
    if cached is None or cached[0] != os.getpid():
        cached = (os.getpid(), Resources(settings))
        app._lipsync_resources = cached
    return cached[1]
