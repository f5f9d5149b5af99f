"""Telling the caller: task callbacks, signed webhooks owed from an outbox until delivered. No Celery."""

from worker.callbacks.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
