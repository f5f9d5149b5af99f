"""Fetching GEN's output into storage: guarded downloads (URL guard, caps), local and S3 backends."""
