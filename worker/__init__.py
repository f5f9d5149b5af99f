"""lipsync-worker: run GEN lipsync generations as Celery chains (submit -> poll -> fetch-output).

``celery -A worker worker`` finds the Celery app as ``worker.app``. It is loaded lazily, so the GEN
client, the job logic and the models can be imported without building a Celery app. The layers are
described in the README ("Development") and enforced by the import contracts in pyproject.toml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
