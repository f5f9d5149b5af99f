"""Cheap exception info for every ``Task.retry`` (billiard 4.3 on Python 3.11+).

Each time a task raises (a poll's ``self.retry`` included), Celery wraps the exception in billiard's
``ExceptionInfo`` in the pool process and pickles it back to the main process. Its ``Traceback``
copies every frame, and for each frame's code object billiard 4.3 lists ``code.co_positions()``
eagerly: one 4-tuple per bytecode instruction. Celery's own ``trace_task`` frame is in every
such traceback and has some 2,300 instructions; listing them takes about 0.37 ms, ``Task.retry``'s
another 0.12 ms, and the tuples are then pickled and unpickled across the pool's pipe. A poll that
finds GEN still working paid more for that than for asking GEN.

The positions only draw the ``^^^^`` carets of a formatted traceback, and the traceback of a retry
or failure is formatted from the live frames before any of this (``ExceptionInfo.traceback``, the
string Flower, the task events and the result backend show). So :class:`LazyCode` reads the
positions from the real code object only when something formats the copied traceback in the same
process, and leaves them out when it is pickled: a traceback formatted after crossing the pipe
shows every file, line and function, without carets.

Installed by setting ``billiard.einfo._Frame.Code``, the class billiard builds each frame's code
copy from; idempotent, and a no-op on a billiard whose ``_Code`` does not keep positions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any

from billiard import einfo

#: What ``co_positions`` yields where the positions are unknown: ``traceback`` then falls back to
#: the frame's line number and draws no carets.
_UNKNOWN = (None, None, None, None)
_CODE = "_lipsync_code"


class LazyCode(einfo._Code):
    """billiard's picklable stand-in for a code object, with positions read on demand."""

    def __init__(self, code: CodeType) -> None:
        # billiard's own fields, except the positions list.
        self.co_filename = code.co_filename
        self.co_name = code.co_name
        self.co_argcount = code.co_argcount
        self.co_cellvars = ()
        self.co_firstlineno = code.co_firstlineno
        self.co_flags = code.co_flags
        self.co_freevars = ()
        self.co_code = b""
        self.co_lnotab = b""
        self.co_names = code.co_names
        self.co_nlocals = code.co_nlocals
        self.co_stacksize = code.co_stacksize
        self.co_varnames = ()
        self.co_qualname = code.co_qualname
        # The real code object stays in this process (code objects do not pickle).
        self.__dict__[_CODE] = code

    @property
    def co_positions(self) -> Callable[[], Iterable[tuple[int | None, ...]]]:
        code: CodeType | None = self.__dict__.get(_CODE)
        if code is not None:
            return code.co_positions
        return lambda: itertools.repeat(_UNKNOWN)

    def __reduce__(self) -> tuple[Any, ...]:
        state = {key: value for key, value in self.__dict__.items() if key != _CODE}
        return LazyCode.__new__, (LazyCode,), state


def _billiard_lists_positions() -> bool:
    """Whether this billiard's ``_Code`` keeps a positions list (the cost this module removes)."""
    return "_co_positions" in vars(einfo._Code(_billiard_lists_positions.__code__))


def install() -> None:
    """Make billiard copy frames with :class:`LazyCode` (idempotent)."""
    frame_cls: Any = einfo._Frame
    if frame_cls.Code is LazyCode or not _billiard_lists_positions():
        return
    frame_cls.Code = LazyCode
