"""Celery's Redis result backend, storing a task's state in one round trip instead of two.

Before every store Celery reads the stored state and writes nothing over a SUCCESS (a redelivered
or lost task must not overwrite a result: celery/backends/base.py, ``_store_result``). That read
and the write (SETEX + PUBLISH in a MULTI) are two round trips, and another store can land
between them. A job stores its state four or five times (the progress under the caller's id, the
steps' results), so here one script does the read, the write and the publish: one round trip,
atomic, the same stored value and the same message to subscribers. Everything else (keys,
encoding, expiry, retries, reading, result consumers) is Celery's RedisBackend.

Used for ``redis://`` and ``rediss://`` result backends (:func:`backend_setting`); a producer
with plain Celery reads what it stores.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

__all__ = ["ResultBackend", "backend_setting"]

#: KEYS[1] the result key; ARGV[1] the encoded meta, ARGV[2] seconds to keep it (0: for ever).
#: Skips the write if the stored state is SUCCESS, as Celery does. A stored value that is not JSON
#: is overwritten (Celery's read would raise; a JSON-only app never stores one).
_STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local keep = tonumber(ARGV[2])
if keep > 0 then
  redis.call('SETEX', KEYS[1], keep, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


#: Celery's stubs know little of RedisBackend's internals used here (serializer, expires, ...).
_RedisBackend: Any = RedisBackend


class ResultBackend(_RedisBackend):  # type: ignore[misc]  # an untyped base, as said above
    """RedisBackend whose store is one script (see the module docstring)."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.serializer != "json":  # the script reads the stored state as JSON
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            # As RedisBackend.set says it, with what Celery's own store adds (its stubs lag).
            raise BackendStoreError(  # type: ignore[call-arg]
                "value too large for Redis backend", state=state, task_id=task_id
            )
        keep = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_unless_succeeded, (self.get_key_for_task(task_id), value, keep))
        return result

    def _store_unless_succeeded(self, key: bytes | str, value: str | bytes, keep: int | None) -> None:
        # Bound to the client of the moment: Celery makes a new one in each forked pool process.
        # A Script sends EVALSHA, and loads itself again after a NOSCRIPT (a restarted Redis).
        self.client.register_script(_STORE)(keys=[key], args=[value, int(keep or 0)])


#: How Celery is told to use :class:`ResultBackend` for a URL: "module:Class+url" (celery.app.backends).
_CLASS = f"{ResultBackend.__module__}:{ResultBackend.__qualname__}"


def backend_setting(url: str) -> str:
    """The ``result_backend`` setting for ``url``: :class:`ResultBackend` for a Redis URL, else
    the URL as it is (Celery picks the backend by its scheme)."""
    scheme = url.partition("://")[0]
    return f"{_CLASS}+{url}" if scheme in ("redis", "rediss") else url
