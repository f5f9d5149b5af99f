"""The receiver's secret path (worker.events.tokens): checking, matching and masking the token."""

from __future__ import annotations

import pytest

from worker.events.tokens import (
    BadToken,
    check_token,
    mask_text,
    mask_url,
    receiver_url,
    token_in,
    token_matches,
)

TOKEN = "Zq8x-3kP_w7Lr2Vn9Tb4"


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "not set"), ("", "not set"), ("x1y2z3", "shorter"), ("a" * 20 + "/x", "only letters")],
)
def test_weak_or_missing_tokens_are_refused_without_echoing_them(token: str | None, reason: str) -> None:
    with pytest.raises(BadToken, match=reason) as refused:
        check_token(token)
    if token:
        assert token not in str(refused.value)


def test_a_long_url_safe_token_is_accepted() -> None:
    assert check_token(TOKEN) == TOKEN


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        (f"/gen-events/{TOKEN}", True),
        (f"/gen-events/{TOKEN}/", True),
        (f"/gen-events/{TOKEN}x", False),
        (f"/gen-events/{TOKEN[:-1]}", False),
        ("/gen-events/", False),
        ("/gen-events", False),
        (f"/other/{TOKEN}", False),
        (f"/gen-events/{TOKEN}/extra", False),
        ("/gen-events/ünïcode", False),
    ],
)
def test_only_the_tokens_path_matches(path: str, matches: bool) -> None:
    assert token_matches(path, TOKEN) is matches


@pytest.mark.parametrize(
    "base",
    ["https://hooks.example.com", "https://hooks.example.com/", "https://hooks.example.com/gen-events"],
)
def test_the_registered_url_completes_the_path_with_the_token(base: str) -> None:
    url = receiver_url(base, TOKEN)
    assert url == f"https://hooks.example.com/gen-events/{TOKEN}"
    assert token_in(url) == TOKEN


def test_a_url_with_a_token_is_kept_as_given() -> None:
    url = "https://hooks.example.com/lipsync/gen-events/another-token-0123456"
    assert receiver_url(url, TOKEN) == url
    assert token_in(url) == "another-token-0123456"
    assert token_in("https://hooks.example.com/") is None


def test_masking_hides_the_token_passwords_and_queries() -> None:
    url = f"https://user:pw@hooks.example.com/gen-events/{TOKEN}?sig=abc"
    masked = mask_url(url)
    assert masked == "https://***@hooks.example.com/gen-events/***?***"
    for secret in (TOKEN, "pw", "abc"):
        assert secret not in masked
    text = f'{{"webhook_url": "https://h/gen-events/{TOKEN}", "echo": "{TOKEN}"}}'
    assert TOKEN not in mask_text(text, TOKEN)
    # A token the caller does not know is still masked where a receiver path shows it.
    assert "other-token" not in mask_text("POST /gen-events/other-token HTTP/1.1", None)
