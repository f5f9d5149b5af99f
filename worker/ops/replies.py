"""Reading Redis replies the same way whatever the client: ``decode_responses`` may be on or off."""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
