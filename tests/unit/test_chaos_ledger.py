"""The chaos ledger's reading of the handler journal (pure logic: bench.chaos.runs)."""

from __future__ import annotations

from typing import Any

from bench.chaos import runs


def line(what: str, event: str, attempt: int, pid: int, t: float, ok: bool | None = None) -> Any:
    return {"what": what, "event": event, "attempt": attempt, "pid": pid, "t": t, "ok": ok}


def test_a_run_that_ends_after_the_next_run_started_is_an_overlap() -> None:
    journal = [
        line("start", "a", 1, 10, 1.0),
        line("start", "a", 2, 20, 5.0),  # taken over while attempt 1 was paused...
        line("end", "a", 2, 20, 5.5, ok=True),
        line("end", "a", 1, 10, 9.0, ok=True),  # ...which then resumed and completed
    ]
    found = runs(journal)
    assert found.invocations == 2
    assert found.overlapping == ["a: attempt 1 ended after attempt 2 had started"]


def test_stopped_and_sequential_runs_are_not_overlaps() -> None:
    journal = [
        line("start", "a", 1, 10, 1.0),  # stopped by its lease: no end
        line("start", "a", 2, 20, 5.0),
        line("end", "a", 2, 20, 5.5, ok=False),
        line("start", "a", 3, 20, 7.0),
        line("end", "a", 3, 20, 7.5, ok=True),
        line("start", "b", 1, 10, 1.0),
        line("end", "b", 1, 10, 1.2, ok=True),
        line("start", "b", 2, 20, 3.0),  # run again after a crash lost its outcome
        line("end", "b", 2, 20, 3.1, ok=True),
    ]
    found = runs(journal)
    assert (found.invocations, found.stopped, found.overlapping) == (5, 1, [])
    assert found.ended_ok == {"a", "b"}
    assert found.rerun_after_ok == ["b attempt 2"]
    assert found.attempt_started_twice == []


def test_the_same_attempt_started_twice_is_reported() -> None:
    journal = [line("start", "a", 1, 10, 1.0), line("start", "a", 1, 20, 2.0)]
    assert runs(journal).attempt_started_twice == ["a attempt 1"]
