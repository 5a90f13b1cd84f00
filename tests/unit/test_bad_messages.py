"""The message corpus in tests/data/bad_messages: each value decodes to its documented outcome.

The corpus and its renderer live in :mod:`tests.support.corpus` (the consumer's integration
test replays it through Kafka); here it only goes through the pure decoder the consumer uses (decode_message: events and
commands).
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime

import pytest

from eventsched.core.domain.decode import DECODE_REASONS
from eventsched.core.domain.event import Event
from eventsched.core.domain.message import decode_message
from eventsched.core.runtime.errors import DecodeError
from tests.support.corpus import CORPUS_DIR, LIMITS, CorpusCase, load_corpus

NOW = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)

CASES = load_corpus(NOW)


def check(case: CorpusCase, now: datetime) -> None:
    if case.expect == "ok":
        event = decode_message(case.value, now=now, limits=LIMITS, headers=case.headers)
        assert isinstance(event, Event)
        assert (event.shape, event.late) == (case.shape, case.late)
        return
    with pytest.raises(DecodeError) as info:
        decode_message(case.value, now=now, limits=LIMITS, headers=case.headers)
    assert info.value.reason == case.expect, info.value.detail
    detail = info.value.detail
    assert "\n" not in detail and 0 < len(detail) <= 200  # a one-liner, never the message
    if case.detail_contains:
        assert case.detail_contains in detail


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_decodes_to_its_expected_outcome(case: CorpusCase) -> None:
    check(case, NOW)


def test_corpus_outcomes_do_not_depend_on_the_date() -> None:
    now = datetime.now(UTC)
    for case in load_corpus(now):
        check(case, now)


def test_manifest_lists_every_file_and_covers_every_reason() -> None:
    manifest = tomllib.loads((CORPUS_DIR / "cases.toml").read_text())["case"]
    listed = {entry["file"] for entry in manifest if "file" in entry}
    on_disk = {p.name for p in CORPUS_DIR.iterdir() if p.name != "cases.toml"}
    assert listed == on_disk
    assert all(entry.keys() >= {"expect", "description"} for entry in manifest)
    rejected = [c for c in CASES if c.expect != "ok"]
    assert len(rejected) >= 30
    assert {c.expect for c in rejected} == set(DECODE_REASONS)
    assert len([c for c in CASES if c.expect == "ok"]) >= 5
