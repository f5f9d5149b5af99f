"""GEN's own events as a hint to poll now: the receiver (``lipsync-worker events``), reading any
payload shape, and the secret path. See docs/events.md."""
