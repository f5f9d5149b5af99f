"""Batches: many lipsync jobs as one request, with one batch callback (worker.batches.progress)."""
