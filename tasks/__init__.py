"""Celery tasks of the lipsync job chain. The app (worker.app) includes them explicitly."""
