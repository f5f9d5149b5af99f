"""The docs state one delivery guarantee for callbacks: at least once, under a stable id.

"Exactly once" is not something a callback over a network can promise (a crash between sending and
recording the send makes the sweeper send again); receivers must dedupe on the id, so no page may
tell them otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def claims_exactly_once_callbacks(text: str) -> list[str]:
    """Sentences that tie callbacks to "exactly once" without saying "at least once"."""
    sentences = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [
        " ".join(s.split())
        for s in sentences
        if re.search(r"exactly[ -]once", s, re.I)
        and re.search(r"callback|webhook", s, re.I)
        and not re.search(r"at[ -]least[ -]once", s, re.I)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_promises_exactly_once_callbacks(page: Path) -> None:
    assert claims_exactly_once_callbacks(page.read_text()) == []


def test_the_readme_says_at_least_once_and_what_to_dedupe_on() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert re.search(r"at least once\*?\*?: every message carries a stable id", readme)
    assert "receivers dedupe on the id" in readme
