"""Per-process resources: one GEN client, one HTTP session, one Redis connection pool.

Built lazily and keyed by process id, because Celery's prefork pool forks children after the
parent imported everything: a socket inherited across fork would be shared by two processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import redis
import requests

from worker.callbacks.outbox import Outbox
from worker.callbacks.webhooks import outbox_ttl
from worker.gen.client import GenClient
from worker.gen.errors import GenRateLimited
from worker.jobs.durations import DurationLog, PollPlanner
from worker.jobs.liveness import Holders
from worker.jobs.ratelimit import Budget, FleetRateLimiter
from worker.jobs.records import JobStore
from worker.ops import metrics
from worker.output.download import DownloadLimits
from worker.output.s3 import S3Storage
from worker.output.safe_http import egress_session
from worker.output.storage import LocalStorage, Storage
from worker.settings import Settings, get_settings

#: (``redis`` inside the class body names the property below.)
BrokerRedis = redis.Redis

USER_AGENT = "lipsync-worker/0.1 (+python-requests)"

#: GEN endpoints (GenClient's names) whose calls the steps pace themselves, against their own
#: budgets, coming back later rather than waiting (worker.jobs.steps): the client's pacer must not
#: count them a second time.
PACED_BY_THE_STEPS = frozenset({"generate", "get_generation"})


@dataclass
class Resources:
    settings: Settings
    #: The clock the steps read (epoch seconds); tests of the steps move it by hand.
    clock: Callable[[], float] = field(default=time.time)

    @cached_property
    def gen(self) -> GenClient:
        redis_client = self.redis

        def observe(endpoint: str, status: int | None, seconds: float) -> None:
            metrics.record_gen_call(redis_client, endpoint=endpoint, status=status, seconds=seconds)

        return GenClient.from_settings(self.settings, on_call=observe, pace=self._pace_gen_call)

    def _pace_gen_call(self, endpoint: str) -> None:
        """Hold a GEN call the steps do not pace (a stop, a content-resource lookup...) until the
        fleet's status budget has room, for at most one GEN read timeout; past that, refuse it as
        rate limited (retryable, Retry-After the window's wait) rather than hold the worker."""
        if endpoint in PACED_BY_THE_STEPS:
            return
        wait = self.limiter.wait("status", max_wait=self.settings.gen_read_timeout)
        if wait > 0:
            raise GenRateLimited(
                f"no room in the fleet's GEN call budget (LIPSYNC_GEN_STATUS_RATE) for {wait:.1f} s",
                retry_after=wait,
                endpoint=endpoint,
            )

    @cached_property
    def http(self) -> requests.Session:
        """Session for downloads and webhooks (not GEN: that one carries the API key)."""
        # Output and webhook URLs come from outside: addresses are checked where sockets open
        # (DNS rebinding), and only LIPSYNC_EGRESS_PROXY, not the environment, may proxy them.
        s = self.settings
        return egress_session(allow_private=s.allow_private_urls, proxy=s.egress_proxy, user_agent=USER_AGENT)

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
    def planner(self) -> PollPlanner:
        """When to poll next: what this fleet learned of GEN's generation times."""
        return PollPlanner(DurationLog(self.redis, keep=self.settings.poll_learn_window), self.settings)

    @cached_property
    def outbox(self) -> Outbox:
        return Outbox(self.redis, ttl=outbox_ttl(self.settings))

    @cached_property
    def holders(self) -> Holders:
        return Holders(self.redis)

    @cached_property
    def broker_redis(self) -> BrokerRedis | None:
        """The broker's Redis (to see which messages are still unacknowledged), or None when the
        broker is not Redis."""
        url = self.settings.broker_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        if url == self.settings.effective_redis_url:
            return self.redis
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)

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
        return LocalStorage(s.storage_dir, file_mode=s.output_mode)

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
