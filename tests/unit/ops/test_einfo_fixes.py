"""billiard's copy of a traceback, as every retry and failure of a task builds and pickles it.

worker.ops.einfo_fixes stops billiard listing each frame's bytecode positions up front, which was
most of what a poll's retry cost in billiard. What must not change: the traceback reads the same
where it was made, and still formats after crossing the pool's pipe.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from types import TracebackType
from typing import Any

from billiard import einfo
from billiard.einfo import ExceptionInfo

import worker.app  # noqa: F401 - creating the app installs the fix
from worker.ops import einfo_fixes


def _nested(depth: int) -> None:
    if depth == 0:
        raise ValueError("the generation is still running")
    _nested(depth - 1)


def _raised() -> tuple[type[BaseException], BaseException, TracebackType]:
    try:
        _nested(3)
    except ValueError:
        kind, exc, tb = sys.exc_info()
        assert kind is not None and exc is not None and tb is not None
        return kind, exc, tb
    raise AssertionError("unreachable")


def _frames(tb: Any) -> list[tuple[str, int | None, str]]:
    return [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(tb)]


def test_the_app_installs_it() -> None:
    assert einfo._Frame.Code is einfo_fixes.LazyCode


def test_no_positions_are_listed_when_the_traceback_is_copied() -> None:
    info = ExceptionInfo(_raised())
    for code in _codes(info.tb):
        assert isinstance(code, einfo_fixes.LazyCode)
        assert "_co_positions" not in vars(code)


def test_the_copy_formats_as_the_live_traceback_does_carets_included() -> None:
    raised = _raised()
    info = ExceptionInfo(raised)
    assert traceback.format_tb(info.tb) == traceback.format_tb(raised[2])
    assert info.traceback == "".join(traceback.format_exception(*raised))


def test_after_the_pipe_it_formats_every_frame_without_positions() -> None:
    raised = _raised()
    info = ExceptionInfo(raised)
    crossed = pickle.loads(pickle.dumps(info))
    assert _frames(crossed.tb) == _frames(raised[2])
    assert crossed.traceback == info.traceback  # the text the task events and results carry
    assert "still running" in "".join(traceback.format_exception(crossed.type, crossed.exception, crossed.tb))


def test_the_pickled_copy_no_longer_carries_the_positions() -> None:
    raised = _raised()
    crossed = pickle.loads(pickle.dumps(ExceptionInfo(raised)))
    einfo._Frame.Code = einfo._Code
    try:
        eager = pickle.loads(pickle.dumps(ExceptionInfo(raised)))
    finally:
        einfo._Frame.Code = einfo_fixes.LazyCode
    # billiard's own copy carries a 4-tuple per instruction of every frame; ours none.
    assert all("_co_positions" in vars(code) for code in _codes(eager.tb))
    assert not any("_co_positions" in vars(code) for code in _codes(crossed.tb))
    assert len(_codes(crossed.tb)) == len(_codes(eager.tb)) == 5


def _codes(tb: Any) -> list[Any]:
    codes = []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


def test_install_is_idempotent() -> None:
    einfo_fixes.install()
    einfo_fixes.install()
    assert einfo._Frame.Code is einfo_fixes.LazyCode
