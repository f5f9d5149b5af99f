"""All configuration, in one typed object read from ``LIPSYNC_*`` environment variables (and ``.env``).

Celery's own configuration is derived from this object in :mod:`worker.app`; there is no second
config system. Secrets are ``SecretStr`` with no default: they print as ``**********`` and are
checked where they are needed, so a producer that only enqueues jobs needs no GEN key.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.names import Dialect, LipsyncModel

ENV_PREFIX = "LIPSYNC_"


class Settings(BaseSettings):
    """Every setting, with its environment variable ``LIPSYNC_<NAME>``. The README lists them all."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        # Validation errors must not echo a secret's value back into a log.
        hide_input_in_errors=True,
    )

    # -- broker and state ---------------------------------------------------------------------
    #: Celery broker. Redis is the supported and tested broker.
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Celery result backend; defaults to the broker URL.
    result_backend: str | None = None
    #: Redis for job records, locks and rate limits; defaults to the broker URL.
    redis_url: str | None = None
    #: Redis visibility timeout (seconds): an unacknowledged message is redelivered after this long.
    #: It must stay far above the longest step (the download) and the longest poll countdown.
    visibility_timeout: int = Field(default=7200, ge=60)
    #: Longest wait between a worker's attempts to reconnect to a lost broker (seconds); the waits
    #: grow 1, 2, 3 … s up to it (worker.ops.reconnect). Celery's own would grow to 30 s.
    broker_reconnect_max: float = Field(default=5.0, ge=1.0)
    #: How long finished results and job records are kept in Redis (seconds).
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60)

    # -- GEN ------------------------------------------------------------------------------------
    gen_base_url: AnyUrl = AnyUrl("https://api.gen.pro")
    #: GEN personal access token, sent as ``X-API-Key``. Required by the worker; never logged.
    gen_api_key: SecretStr | None = None
    #: GEN agent whose sheets the jobs run on (``agent_id`` query parameter).
    gen_agent_id: str | None = None
    #: Which of GEN's two documented request bodies to send (see worker.names.Dialect). GEN's
    #: current documentation, SDK and MCP server use ``vidsheet`` (migrated from
    #: ``autocontentengine`` on 2026-06-01); the older dialect is kept for GENs that still want it.
    gen_dialect: Dialect = "vidsheet"
    #: Sources given by URL (``video_url``/``audio_url``) in the ``autocontentengine`` dialect are
    #: downloaded and uploaded to GEN as content resources first; off: such requests are refused.
    gen_upload_sources: bool = True
    #: Largest source uploaded multipart (bytes; GEN takes up to 50 MB that way); larger ones go through
    #: GEN's 3-step direct upload (up to 1 GiB), streamed from a temporary file.
    gen_multipart_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    gen_connect_timeout: float = Field(default=5.0, gt=0)
    gen_read_timeout: float = Field(default=30.0, gt=0)
    #: Model used when a request names none (GEN's ``lipSyncModel`` card setting).
    default_model: LipsyncModel = "gen"

    # -- the job's pace -----------------------------------------------------------------------------
    #: Wall-clock limit for one job (seconds). Past it the generation is stopped on GEN.
    job_timeout: float = Field(default=1800.0, gt=0)
    #: First poll delay after submit, and the cap the delay grows to (seconds).
    poll_initial_delay: float = Field(default=5.0, gt=0)
    poll_max_delay: float = Field(default=30.0, gt=0)
    poll_backoff_factor: float = Field(default=1.5, ge=1.0)
    #: Fraction of each delay randomised away, so polls of many jobs do not march in step.
    poll_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    #: Learn GEN's generation times per model, fleet-wide, and poll when generations usually end
    #: (docs/polling.md). Off: the schedule above, always.
    poll_learn: bool = True
    #: Generations of a model seen before its learned plan replaces the schedule above.
    poll_learn_min_samples: int = Field(default=5, ge=1)
    #: Generation times kept per model, and after how many newer ones a time counts half.
    poll_learn_window: int = Field(default=60, ge=1)
    poll_learn_half_life: float = Field(default=10.0, gt=0)
    #: What one status call to GEN is worth, as lateness relative to the generation's duration:
    #: 0.03 = one fewer call is worth finishing 3 % later. Higher: fewer calls, more delay.
    poll_call_cost: float = Field(default=0.03, gt=0)
    #: Never poll the same generation sooner than this after the previous poll (seconds).
    poll_min_delay: float = Field(default=0.5, gt=0)
    #: Past the longest time seen, poll every this fraction of the time elapsed.
    poll_tail_fraction: float = Field(default=0.15, gt=0)
    #: Where fewer than this share of a model's generations are still running, poll as past the
    #: longest time seen instead of planning polls for them (docs/polling.md). 0: plan them too.
    poll_rare_share: float = Field(default=0.05, ge=0.0, lt=1.0)
    #: How often each process re-reads what the fleet learned (seconds).
    poll_plan_refresh: float = Field(default=10.0, gt=0)
    #: Cap of our own backoff before retrying a transient error (seconds). A longer Retry-After from
    #: GEN is still honoured, up to 15 min (worker.retry.MAX_COUNTDOWN).
    retry_max_delay: float = Field(default=60.0, gt=0)
    #: Transient errors tolerated on submit or on download before the job fails.
    max_transient_retries: int = Field(default=10, ge=0)
    #: Unreadable GEN answers tolerated while polling before the job fails.
    max_bad_responses: int = Field(default=5, ge=0)

    # -- recovery -------------------------------------------------------------------------------
    #: Seconds past a job's expected next step (a due poll, a download's time limit) after which
    #: the sweeper re-drives it. Bounds recovery from a killed worker or a lost message.
    recovery_grace: float = Field(default=60.0, gt=0)
    #: The same for a message that waits in a queue (a backlog is not a failure): only a broker
    #: that lost data loses such a message.
    queued_recovery: float = Field(default=3600.0, gt=0)
    #: How often each worker tries to sweep (one of them wins a lease per round).
    sweep_interval: float = Field(default=5.0, gt=0)
    #: How often each worker node writes its heartbeat to Redis (from a thread of its own).
    heartbeat_interval: float = Field(default=5.0, gt=0)
    #: A node whose last heartbeat is this old is dead: the sweeper re-drives every job whose
    #: message it held (reserved, waiting on a countdown, running), at any stage.
    node_dead_after: float = Field(default=20.0, gt=0)
    #: Queues lipsync workers do not consume where misrouted lipsync messages land (a producer that
    #: sent ``lipsync.run`` without ``queue="lipsync"`` reaches Celery's default queue): each sweep
    #: moves them to their own queue and warns (comma separated; ``none``: leave them alone).
    misroute_queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["celery"])
    #: How often the sweeper checks, at the least, that every unfinished job still has a message in
    #: the broker (a broker restart can lose one); after a worker dies or reconnects, every sweep.
    audit_interval: float = Field(default=300.0, gt=0)
    #: A job re-driven this many times fails with ``redrive_limit`` instead of crash-looping.
    max_redrives: int = Field(default=5, ge=1)

    # -- batches (lipsync.run_batch) -----------------------------------------------------------
    #: Items a batch may hold; a larger batch is refused whole (``batch_too_large``).
    max_batch_items: int = Field(default=1000, ge=1)
    #: Items of one batch in flight at once, unless the batch asks for fewer or more.
    batch_max_parallel: int = Field(default=20, ge=1)

    # -- fleet-wide GEN rate limits ------------------------------------------------------------
    #: Generate calls allowed per ``gen_rate_window`` across all workers (0 = unlimited).
    gen_generate_rate: int = Field(default=0, ge=0)
    #: Status (poll), stop and other GEN calls allowed per window across all workers (0 = unlimited).
    gen_status_rate: int = Field(default=0, ge=0)
    #: The window of both rate limits (seconds).
    gen_rate_window: float = Field(default=60.0, gt=0)

    # -- operations -------------------------------------------------------------------------------
    #: Log one JSON object per line (with job_id and generation_id) instead of plain text.
    log_json: bool = False

    # -- output ---------------------------------------------------------------------------------
    #: ``local`` (a directory) or ``s3`` (S3-compatible object storage; the ``s3`` extra).
    storage_backend: Literal["local", "s3"] = "local"
    #: Where outputs are stored (local storage backend), and where downloads are staged.
    storage_dir: Path = Path("lipsync-output")
    #: Permissions of a stored output (octal). Readable by everyone by default: the consumer of a
    #: shared volume often runs under another uid. ``0640`` or ``0600`` to restrict.
    output_file_mode: str = Field(default="0644", pattern=r"^0?[0-7]{3}$")
    #: Bucket and key prefix for the s3 backend; outputs are ``<prefix><job_id>.mp4``.
    s3_bucket: str | None = None
    s3_prefix: str = "lipsync/"
    #: Endpoint of an S3-compatible service (MinIO, moto, R2...); None means AWS.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: Largest output accepted (bytes).
    max_output_bytes: int = Field(default=2 * 1024**3, gt=0)
    #: Overall time limit for one download (seconds); a slow trickle cannot hold a worker forever.
    download_timeout: float = Field(default=600.0, gt=0)

    # -- callbacks ------------------------------------------------------------------------------
    #: HMAC secret for webhook signatures (Standard Webhooks; ``whsec_`` + base64, or any string).
    #: Without it a webhook callback is refused (see ``allow_unsigned_webhooks``).
    webhook_secret: SecretStr | None = None
    #: Send webhooks unsigned when ``webhook_secret`` is unset. Off: a request with a webhook
    #: callback is refused, so an unset secret cannot silently turn signing off.
    allow_unsigned_webhooks: bool = False
    webhook_timeout: float = Field(default=15.0, gt=0)
    #: Delays between webhook delivery attempts (seconds, comma separated). Each is a countdown
    #: held unacknowledged in a worker, so each must stay below the visibility timeout; the
    #: default spreads eleven attempts over about two hours.
    webhook_retry_delays: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 900.0, 900.0, 900.0, 900.0, 900.0, 900.0]
    )

    # -- safety ---------------------------------------------------------------------------------
    #: Allow webhook and download URLs on private/loopback/link-local addresses (tests, the demo,
    #: an in-cluster GEN simulator). Off in production: it is the SSRF guard.
    allow_private_urls: bool = False
    #: The HTTP proxy (``http://host:port``) that downloads and webhooks go through; unset: they
    #: connect directly. ``HTTP(S)_PROXY`` in the environment is ignored for them, because a proxy
    #: bypasses the connect-time address check (worker.output.safe_http): the proxy named here is
    #: then the egress filter. GEN calls are not affected.
    egress_proxy: str | None = None

    # -- GEN events (lipsync-worker events) ---------------------------------------------------------
    #: The secret in the receiver's path (``/gen-events/<token>``): GEN's webhook carries no
    #: signature, so knowing the URL is the only proof. Unset: ``lipsync-worker events`` refuses to
    #: start. Never logged.
    events_token: SecretStr | None = None
    #: Where ``lipsync-worker events`` listens (GEN must reach it, usually through an ingress).
    events_host: str = "0.0.0.0"  # noqa: S104 - a receiver for another host's POSTs
    events_port: int = Field(default=9809, ge=0, le=65535)
    #: Largest event body read (bytes); a longer one is refused unread (413).
    events_max_body: int = Field(default=256 * 1024, gt=0)
    #: At most one nudge (an early poll) per job in this many seconds, however many events name it.
    events_nudge_interval: float = Field(default=2.0, ge=0)

    @field_validator("webhook_retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        if isinstance(value, int | float):
            return [float(value)]
        return value

    @field_validator("egress_proxy")
    @classmethod
    def _http_proxy(cls, value: str | None) -> str | None:
        # Said here, at start-up: requests would take a bare host:port or socks5:// (without
        # PySocks) and fail on the first finished job instead.
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("LIPSYNC_EGRESS_PROXY must be an http:// or https:// URL")
        return value

    @field_validator("misroute_queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            return [] if parts == ["none"] else parts
        return value

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an explicit ``LIPSYNC_*`` mapping only (not the process environment).

        Used where one process configures another (the demo, the tests).
        """
        values = {
            k.removeprefix(ENV_PREFIX).lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)
        }
        return cls.model_validate(values)

    @model_validator(mode="after")
    def _countdowns_below_visibility_timeout(self) -> Settings:
        longest = max(self.webhook_retry_delays, default=0.0)
        if longest >= self.visibility_timeout:
            raise ValueError(
                f"LIPSYNC_WEBHOOK_RETRY_DELAYS has a {longest:.0f} s delay, not below "
                f"LIPSYNC_VISIBILITY_TIMEOUT ({self.visibility_timeout} s): Redis would redeliver it"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_fit_in_the_dead_window(self) -> Settings:
        # One late or lost beat must not make a live node look dead.
        if self.node_dead_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"LIPSYNC_NODE_DEAD_AFTER ({self.node_dead_after:g} s) must be at least twice "
                f"LIPSYNC_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s)"
            )
        return self

    @property
    def output_mode(self) -> int:
        """:attr:`output_file_mode` as a number for ``os.chmod``."""
        return int(self.output_file_mode, 8)

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or self.broker_url

    @property
    def gen_base(self) -> str:
        return str(self.gen_base_url).rstrip("/")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def settings_of(app: object) -> Settings:
    """The settings a Celery app made by :func:`worker.app.create_app` was given, else the process's."""
    given: Settings | None = getattr(app, "lipsync_settings", None)
    return given or get_settings()
