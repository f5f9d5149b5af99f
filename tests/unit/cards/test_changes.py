"""The pure decisions of worker.cards.changes and the card/change contract."""

from __future__ import annotations

import pytest

from worker.cards.changes import Action, Situation, decide, fingerprint, job_id_for, merge
from worker.cards.models import Card, SourceChange, Sources, Target
from worker.errors import RequestInvalid

A = Sources(video_resource_id="5001", audio_resource_id="6001")
B = Sources(video_resource_id="5001", audio_resource_id="6002")


def test_a_change_keeps_the_side_it_does_not_name() -> None:
    merged = merge(A, Sources(audio_resource_id="6002"))
    assert merged == B


def test_a_url_replaces_a_resource_id_of_the_same_side() -> None:
    merged = merge(A, Sources(video_url="https://media.example/take2.mp4"))
    assert merged.video_resource_id is None and merged.video == "https://media.example/take2.mp4"
    assert merged.audio == "6001"


def test_equal_sources_have_equal_fingerprints_and_others_differ() -> None:
    assert fingerprint(A) == fingerprint(Sources(audio_resource_id="6001", video_resource_id="5001"))
    assert fingerprint(A) != fingerprint(B)


@pytest.mark.parametrize(
    ("sources", "output", "inflight", "action"),
    [
        (A, None, None, Action.START),
        (A, fingerprint(A), None, Action.NOTHING),
        (B, fingerprint(A), None, Action.START),
        (B, None, fingerprint(A), Action.SUPERSEDE),
        (B, None, fingerprint(B), Action.NOTHING),
        (A, fingerprint(A), fingerprint(B), Action.STOP),
        (Sources(video_resource_id="5001"), None, None, Action.INCOMPLETE),
    ],
)
def test_the_settle_decision(
    sources: Sources, output: str | None, inflight: str | None, action: Action
) -> None:
    assert decide(Situation(sources, output_fp=output, inflight_fp=inflight)) == action


def test_job_ids_are_derived_from_the_target_and_the_sequence() -> None:
    assert job_id_for(Target(sheet_id="101", cell_id="3000", layer_id="4000"), 7) == "card.101.3000.4000~7"
    assert job_id_for(Target(sheet_id="101", cell_id="3000"), 7) == "card.101.3000~7"
    long = Target(sheet_id="s" * 64, cell_id="c" * 64, layer_id="l" * 64)
    assert len(job_id_for(long, 123456)) <= 128
    assert job_id_for(long, 1) != job_id_for(
        Target(sheet_id="s" * 64, cell_id="c" * 64, layer_id="x" * 64), 1
    )


def test_a_card_accepts_gen_spellings() -> None:
    card = Card.parse({"sheet_id": 101, "cell_id": 3000, "lipSyncModel": "sync.so", "autoGenerate": True})
    assert (card.lip_sync_model, card.auto_generate, card.debounce_seconds) == ("sync_so", True, 5.0)


def test_a_card_with_an_unknown_model_is_refused_naming_the_field() -> None:
    with pytest.raises(RequestInvalid) as refused:
        Card.parse({"sheet_id": 101, "cell_id": 3000, "lip_sync_model": "wav2lip"})
    assert [e["field"] for e in refused.value.errors] == ["lip_sync_model"]


def test_a_change_with_neither_side_is_refused_naming_the_fields() -> None:
    with pytest.raises(RequestInvalid) as refused:
        SourceChange.parse({"sheet_id": 101, "cell_id": 3000, "layer_id": 4000})
    fields = {e["field"] for e in refused.value.errors}
    assert fields == {"video_resource_id", "video_url", "audio_resource_id", "audio_url"}


def test_target_names_read_back() -> None:
    for target in (Target(sheet_id="1", cell_id="2"), Target(sheet_id="1", cell_id="2", layer_id="3")):
        assert Target.from_key(target.key) == target
