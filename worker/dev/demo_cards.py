"""The Lipsync card part of ``lipsync-worker demo``: a card with ``autoGenerate`` on, three quick
speech changes, one generation for the latest speech (docs/cards.md)."""

from __future__ import annotations

import time
from typing import Any

from worker.errors import LipsyncJobFailed

#: A target of the simulator's world the other demo jobs do not use.
TARGET = {"sheet_id": "102", "cell_id": "3099", "layer_id": "4099"}
DEBOUNCE = 2.0
SPEECH = ("6051", "6052", "6053")


def run_card_demo(app: Any) -> int:
    from worker.enqueue import configure_card, resources_of, source_changed

    print(
        f"\nLipsync card on sheet {TARGET['sheet_id']} cell {TARGET['cell_id']} layer {TARGET['layer_id']}:"
    )
    configure_card(
        {
            **TARGET,
            "lipSyncModel": "gen",
            "autoGenerate": True,
            "debounce_seconds": DEBOUNCE,
            "metadata": {"demo": "card"},
        },
        app=app,
    )
    print(f"  autoGenerate on, lipSyncModel gen, debounce {DEBOUNCE:g} s")
    answers = []
    for audio in SPEECH:
        answers.append(
            source_changed({**TARGET, "video_resource_id": "5050", "audio_resource_id": audio}, app=app)
        )
        time.sleep(0.3)
    changes = [answer.get(timeout=30) for answer in answers]
    print(f"  {len(changes)} speech changes in {0.3 * (len(SPEECH) - 1):.1f} s: audio {', '.join(SPEECH)}")
    latest = changes[-1]["seq"]
    job_id = f"card.{TARGET['sheet_id']}.{TARGET['cell_id']}.{TARGET['layer_id']}~{latest}"
    deadline = time.monotonic() + 60
    res = resources_of(app)
    while res.jobs.get(job_id) is None:
        if time.monotonic() > deadline:
            print(f"  no generation started for change {latest}")
            return 1
        time.sleep(0.2)
    try:
        outcome = app.AsyncResult(job_id).get(timeout=90)
    except LipsyncJobFailed as exc:
        print(f"  {job_id}: {exc.failure['status']}: {exc.failure['message']}")
        return 1
    started = [
        c["seq"] for c in changes if res.jobs.get(job_id.rsplit("~", 1)[0] + f"~{c['seq']}") is not None
    ]
    record = res.jobs.get(job_id)
    used_audio = ((record.job or {}).get("request") or {}).get("audio_resource_id") if record else None
    print(f"  generations started: {len(started)} (job {job_id}), for audio {used_audio}")
    print(f"  result: {outcome['output']['size_bytes']} bytes at {outcome['output']['path']}")
    return 0 if started == [latest] and used_audio == SPEECH[-1] else 1
