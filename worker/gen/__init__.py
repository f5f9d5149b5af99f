"""The GEN API client: Celery-free, never retries by itself, one error class per kind of answer."""
