import base64

import pytest

from worker.callbacks.signing import WebhookVerificationError, sign, signed_headers, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = b'{"job_id":"j1","status":"completed"}'


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    # Vector from the Standard Webhooks spec's reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


def test_round_trip_and_stable_id() -> None:
    first = signed_headers(SECRET, "job-1.outcome", BODY, now=1_000)
    second = signed_headers(SECRET, "job-1.outcome", BODY, now=1_060)
    assert first["webhook-id"] == second["webhook-id"] == "job-1.outcome"
    assert first["webhook-signature"] != second["webhook-signature"]
    assert verify(SECRET, BODY, first, now=1_010) == "job-1.outcome"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: ({**h, "webhook-id": "other"}, b),
        lambda h, b: ({**h, "webhook-timestamp": "1"}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    ],
)
def test_tampering_is_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    headers = signed_headers(SECRET, "job-1.outcome", BODY, now=1_000)
    bad_headers, bad_body = tamper(headers, BODY)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, bad_body, bad_headers, now=1_000)


def test_stale_timestamp_is_rejected() -> None:
    headers = signed_headers(SECRET, "m", BODY, now=1_000)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, BODY, headers, now=1_000 + 301)


def test_plain_string_secret() -> None:
    headers = signed_headers("plain-secret", "m", BODY, now=5)
    assert verify("plain-secret", BODY, headers, now=5) == "m"
