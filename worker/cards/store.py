"""Cards and their targets' state in Redis, changed atomically (WATCH/MULTI).

Per target (``Target.key``):

* ``lipsync:card:<target>`` — the card (JSON), listed in ``lipsync:cards``;
* ``lipsync:sources:<target>`` — a hash: the latest sources and their change sequence (``seq``),
  the job in flight and the fingerprint of its sources, the job it is superseding (until that one
  is stopped), and the fingerprint of the sources behind the current output;
* ``lipsync:sources:<target>:outputs`` — the resource ids and URLs of the outputs our generations
  wrote (the loop guard);
* ``lipsync:cards:due`` — targets whose latest change is not settled yet, scored by when the settle
  is overdue: what the settle check (:mod:`worker.cards.recovery`) picks up after a crash.

Nothing here expires: a card and its target's state are configuration, kept until deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis

from worker.cards.changes import fingerprint, merge
from worker.cards.models import Card, Sources, Target
from worker.names import (
    CARD_KEY_PREFIX,
    CARD_TARGET_KEY_PREFIX,
    CARDS_AT_KEY_PREFIX,
    CARDS_DUE_KEY,
    CARDS_KEY,
    LipsyncModel,
)

_T = TypeVar("_T")


@dataclass(frozen=True)
class TargetState:
    """A target's sources and what is generated from them."""

    seq: int = 0
    sources: Sources | None = None
    #: When the latest change arrived, and when its debounce window passes (epoch seconds).
    changed_at: float | None = None
    settle_at: float | None = None
    inflight_job: str | None = None
    inflight_fp: str | None = None
    inflight_seq: int | None = None
    #: The job the one in flight replaces, until it is stopped and ended (``superseded``).
    superseding: str | None = None
    output_job: str | None = None
    output_fp: str | None = None

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.sources) if self.sources is not None else None

    @property
    def stale(self) -> bool:
        """The target's output is not for its latest sources (nor is a generation on its way)."""
        latest = self.fingerprint
        return latest is not None and latest != self.output_fp and latest != self.inflight_fp

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "sources": self.sources.model_dump(mode="json", exclude_none=True) if self.sources else None,
            "changed_at": self.changed_at,
            "settle_at": self.settle_at,
            "inflight_job": self.inflight_job,
            "superseding": self.superseding,
            "output_job": self.output_job,
            "stale": self.stale,
        }


@dataclass(frozen=True)
class Recorded:
    """What recording a change did."""

    seq: int
    sources: Sources
    settle_at: float


class CardStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # -- keys --------------------------------------------------------------------------------

    @staticmethod
    def card_key(target: Target) -> str:
        return CARD_KEY_PREFIX + target.key

    @staticmethod
    def state_key(target: Target) -> str:
        return CARD_TARGET_KEY_PREFIX + target.key

    @classmethod
    def outputs_key(cls, target: Target) -> str:
        return cls.state_key(target) + ":outputs"

    # -- cards -------------------------------------------------------------------------------

    def put_card(self, card: Card) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self.card_key(card), card.model_dump_json())
        pipe.sadd(CARDS_KEY, card.target.key)
        for at in _places(card.target):
            pipe.sadd(at, card.target.key)
        pipe.execute()

    def targets_at(self, cell_ids: Iterable[str], layer_ids: Iterable[str]) -> list[Target]:
        """The targets with a card on one of these cells or layers (what a GEN event names)."""
        keys = [f"{CARDS_AT_KEY_PREFIX}cell:{c}" for c in cell_ids]
        keys += [f"{CARDS_AT_KEY_PREFIX}layer:{layer}" for layer in layer_ids]
        if not keys:
            return []
        names = cast(Iterable[bytes], self.redis.sunion(keys))
        return [Target.from_key(name) for name in sorted(_text(raw) for raw in names)]

    def card(self, target: Target) -> Card | None:
        raw = self.redis.get(self.card_key(target))
        return Card.model_validate_json(cast(bytes, raw)) if raw else None

    def model_for(self, sheet_id: str, cell_id: str, layer_id: str | None) -> LipsyncModel | None:
        """The card's ``lip_sync_model`` for a job on this target that names no model (None: no
        card, or a card without one)."""
        card = self.card(Target(sheet_id=sheet_id, cell_id=cell_id, layer_id=layer_id))
        return card.lip_sync_model if card is not None else None

    def delete_card(self, target: Target) -> bool:
        """Forget the card, its target's sources and the loop guard's outputs."""
        pipe = self.redis.pipeline()
        pipe.delete(self.card_key(target))
        pipe.srem(CARDS_KEY, target.key)
        for at in _places(target):
            pipe.srem(at, target.key)
        pipe.delete(self.state_key(target), self.outputs_key(target))
        pipe.zrem(CARDS_DUE_KEY, target.key)
        return bool(pipe.execute()[0])

    def targets(self) -> list[Target]:
        """Every target with a card, sorted by name."""
        names = sorted(_text(raw) for raw in cast(Iterable[bytes], self.redis.smembers(CARDS_KEY)))
        return [Target.from_key(name) for name in names]

    # -- target state ------------------------------------------------------------------------

    def state(self, target: Target, *, client: Any = None) -> TargetState:
        raw = cast(dict[bytes, bytes], (client or self.redis).hgetall(self.state_key(target)))
        return _state_of({k.decode(): v.decode() for k, v in raw.items() if v != b""})

    def outputs(self, target: Target) -> set[str]:
        return {_text(raw) for raw in cast(Iterable[bytes], self.redis.smembers(self.outputs_key(target)))}

    def record_change(
        self, target: Target, change: Sources, *, now: float, debounce: float, schedule: bool, grace: float
    ) -> Recorded:
        """Merge ``change`` into the target's sources and bump its sequence; when ``schedule``,
        the target is due to be settled ``debounce`` (+ ``grace``, for the settle check) from now."""
        key = self.state_key(target)

        def write(pipe: Any) -> Recorded:
            state = self.state(target, client=pipe)
            sources = merge(state.sources, change)
            seq = state.seq + 1
            settle_at = now + debounce
            pipe.multi()
            pipe.hset(
                key,
                mapping={
                    "seq": seq,
                    "sources": sources.model_dump_json(exclude_none=True),
                    "changed_at": repr(now),
                    "settle_at": repr(settle_at),
                },
            )
            if schedule:
                pipe.zadd(CARDS_DUE_KEY, {target.key: settle_at + grace})
            return Recorded(seq, sources, settle_at)

        return self._transaction(write, key)

    def claim(
        self, target: Target, *, seq: int, job_id: str, fp: str, expected: str | None, due: float
    ) -> bool:
        """Make ``job_id`` the target's generation in flight, if the latest change is still ``seq``
        and the job in flight is still ``expected``; the one it replaces is recorded as
        ``superseding`` until :meth:`superseded`. False (nothing written) if either moved on."""
        key = self.state_key(target)

        def write(pipe: Any) -> bool:
            state = self.state(target, client=pipe)
            if state.seq != seq or state.inflight_job != expected:
                pipe.multi()
                return False
            pipe.multi()
            fields = {
                "inflight_job": job_id,
                "inflight_fp": fp,
                "inflight_seq": seq,
                "superseding": expected or "",
            }
            pipe.hset(key, mapping=fields)
            pipe.zadd(CARDS_DUE_KEY, {target.key: due})
            return True

        return self._transaction(write, key)

    def stop_inflight(self, target: Target, *, seq: int, expected: str, due: float) -> bool:
        """Take ``expected`` out of flight (recorded as ``superseding`` until stopped), without a
        new job: the latest sources (still ``seq``) are those of the current output again."""
        key = self.state_key(target)

        def write(pipe: Any) -> bool:
            state = self.state(target, client=pipe)
            pipe.multi()
            if state.seq != seq or state.inflight_job != expected:
                return False
            pipe.hset(
                key,
                mapping={"inflight_job": "", "inflight_fp": "", "inflight_seq": "", "superseding": expected},
            )
            pipe.zadd(CARDS_DUE_KEY, {target.key: due})
            return True

        return self._transaction(write, key)

    def superseded(self, target: Target, job_id: str) -> None:
        """``job_id`` is stopped and ended: no longer in the way of a new generation."""
        key = self.state_key(target)

        def write(pipe: Any) -> None:
            state = self.state(target, client=pipe)
            pipe.multi()
            if state.superseding == job_id:
                pipe.hset(key, "superseding", "")

        self._transaction(write, key)

    def retire(self, target: Target, job_id: str, *, completed: bool) -> bool:
        """The job in flight ended: a completed one's sources are now those of the output."""
        key = self.state_key(target)

        def write(pipe: Any) -> bool:
            state = self.state(target, client=pipe)
            pipe.multi()
            if state.inflight_job != job_id:
                return False
            fields: dict[str, Any] = {"inflight_job": "", "inflight_fp": "", "inflight_seq": ""}
            if completed:
                fields.update(output_job=job_id, output_fp=state.inflight_fp or "")
            pipe.hset(key, mapping=fields)
            return True

        return self._transaction(write, key)

    def add_outputs(self, target: Target, values: Iterable[str]) -> None:
        items = [v for v in values if v]
        if items:
            self.redis.sadd(self.outputs_key(target), *items)

    def settled(self, target: Target, seq: int) -> None:
        """The change ``seq`` is settled: not due any more, unless a newer one came meanwhile."""
        key = self.state_key(target)

        def write(pipe: Any) -> None:
            state = self.state(target, client=pipe)
            pipe.multi()
            if state.seq == seq and state.superseding is None:
                pipe.zrem(CARDS_DUE_KEY, target.key)

        self._transaction(write, key, CARDS_DUE_KEY)

    def due(self, now: float, limit: int = 100) -> list[Target]:
        """Targets whose settle is overdue at ``now``."""
        raw = cast(list[bytes], self.redis.zrangebyscore(CARDS_DUE_KEY, "-inf", now, start=0, num=limit))
        return [Target.from_key(_text(item)) for item in raw]

    def postpone(self, target: Target, until: float) -> None:
        self.redis.zadd(CARDS_DUE_KEY, {target.key: until}, xx=True)

    def _transaction(self, write: Callable[[Any], _T], *keys: str) -> _T:
        """Run ``write`` under WATCH of ``keys`` until no other writer came in between."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*keys)  # type: ignore[no-untyped-call]
                    result = write(pipe)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue


def _places(target: Target) -> list[str]:
    """The index sets a target's card is in: its cell's, or its layer's."""
    if target.layer_id is not None:
        return [f"{CARDS_AT_KEY_PREFIX}layer:{target.layer_id}"]
    return [f"{CARDS_AT_KEY_PREFIX}cell:{target.cell_id}"]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _state_of(fields: dict[str, str]) -> TargetState:
    def number(name: str) -> float | None:
        return float(fields[name]) if name in fields else None

    inflight_seq = fields.get("inflight_seq")
    return TargetState(
        seq=int(fields.get("seq", "0")),
        sources=Sources.model_validate(json.loads(fields["sources"])) if "sources" in fields else None,
        changed_at=number("changed_at"),
        settle_at=number("settle_at"),
        inflight_job=fields.get("inflight_job"),
        inflight_fp=fields.get("inflight_fp"),
        inflight_seq=int(inflight_seq) if inflight_seq else None,
        superseding=fields.get("superseding"),
        output_job=fields.get("output_job"),
        output_fp=fields.get("output_fp"),
    )
