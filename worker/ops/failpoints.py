"""Named points where a test can make the worker die, to prove recovery from the worst moments.

Off unless ``LIPSYNC_FAILPOINTS`` names a point, e.g. ``LIPSYNC_FAILPOINTS=finish.after_dispatch``.
Reaching a named point SIGKILLs the worker's whole process group (the main process and its pool
children), as an OOM killer or a lost node would. Some moments (after GEN accepted a submit but
before we recorded it; after a callback was sent but before the message was acknowledged) are too
narrow to hit with an outside kill; these points make such tests deterministic.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("lipsync.failpoints")

ENV = "LIPSYNC_FAILPOINTS"


def failpoint(name: str) -> None:
    armed = os.environ.get(ENV)
    if not armed or name not in armed.split(","):
        return
    log.critical("failpoint %s reached: killing the worker", name)
    os.killpg(os.getpgid(0), signal.SIGKILL)
