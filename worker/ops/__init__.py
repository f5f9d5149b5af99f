"""What operators see and what keeps the broker connection healthy: metrics, logs, progress events,
a kombu workaround, and the failpoints the fault tests use."""
