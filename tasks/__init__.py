"""Celery tasks, thin translations of the Celery-free steps in :mod:`worker`. The app
(:mod:`worker.app`) includes them explicitly: :mod:`tasks.lipsync` (the job chain) and
:mod:`tasks.callbacks` (webhook delivery)."""
