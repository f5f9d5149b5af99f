"""A short soak in the test suite (the full one is `python -m bench.soak --jobs 300`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.integration


def test_soak_with_kills_a_redis_restart_and_gen_faults(tmp_path: Path) -> None:
    report = run_soak(jobs=80, workers=3, kills=2, redis_restart=True, seed=11, tmp=tmp_path)
    report.print()
    assert report.lost == 0
    assert report.duplicate_generations == 0
    assert report.duplicate_callback_ids == 0
    assert report.missing_callbacks == 0
    assert report.completed + sum(report.failed.values()) == 80
    assert len(report.kills) == 2
