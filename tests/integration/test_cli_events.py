"""``eventsched events``: show, list, cancel, reschedule and retry against the real stack.

Events (and their attempts) are written straight into PostgreSQL; the commands the CLI
sends are read back from the test's topic and decoded with the consumer's own parser.
Most commands run in-process (click's runner); the exit-code tests run a child process,
as a user meets them (one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eventsched.core.domain.commands import Command, parse_command
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import format_time, uuid7
from eventsched.core.kafka import ensure_topics
from tests.support.cli import run
from tests.support.clients import read_topic
from tests.support.eventkeys import EVENT_RETAIN_FROM, REGISTER_KEYS
from tests.support.ingest import child_sections
from tests.support.proc import REPO, free_port
from tests.support.servers import Names
from tests.support.settingsfile import write_settings


@pytest.fixture
def stack(tmp_path: Path, names: Names, database: str, kafka_bootstrap: str) -> Iterator[Path]:
    """A settings file for this test's database and topic (3 partitions)."""
    ensure_topics(kafka_bootstrap, {names.topic: 3, names.dlq_topic: 1})
    yield write_settings(
        tmp_path / "settings.toml",
        child_sections(names, database, "redis://127.0.0.1:1/0", kafka_bootstrap),
    )


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    key: str
    type: str
    status: str
    execute_at: datetime


def insert(
    dsn: str,
    *,
    key: str | None = None,
    type: str = "invoice.due",
    status: str = "scheduled",
    due: datetime | None = None,
    finished_at: datetime | None = None,
    payload: dict[str, Any] | None = None,
    **columns: Any,
) -> Row:
    """One event as the consumer and executor would leave it; ``columns`` set the rest."""
    event_id = uuid7()
    due = (due or datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    values = {
        "id": event_id,
        "idempotency_key": key or str(event_id),
        "type": type,
        "payload": json.dumps(payload or {}),
        "execute_at": due,
        "status": status,
        "created_at": datetime.now(UTC),
        "finished_at": finished_at,
        **columns,
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO events ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))})",
            list(values.values()),
        )
        conn.execute(REGISTER_KEYS)
    return Row(event_id, str(values["idempotency_key"]), type, status, due)


def add_attempt(
    dsn: str, event: Row, attempt: int, *, outcome: str | None, error: str | None
) -> None:
    started = event.execute_at + timedelta(milliseconds=12.5 * attempt)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
            " finished_at, lateness_ms, outcome, error, worker_id, event_retain_from)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, {EVENT_RETAIN_FROM})",
            (event.id, attempt, event.execute_at, started, started, 12.5 * attempt, outcome,
             error, f"worker-{attempt}", event.id),
        )  # fmt: skip


def commands(bootstrap: str, topic: str) -> list[tuple[bytes | None, Command]]:
    """Every message of the topic as (Kafka key, decoded command)."""
    now = datetime.now(UTC)
    return [
        (r.key, parse_command(r.value or b"", now=now, limits=DecodeLimits()))
        for r in read_topic(bootstrap, topic)
    ]


def eventsched(
    settings: Path, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m eventsched --settings FILE ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "eventsched", "--settings", str(settings), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"eventsched: error: {message}"), result.stderr


# -- show, list ------------------------------------------------------------------------------


def test_show_prints_status_due_time_payload_and_every_attempt(stack: Path, database: str) -> None:
    finished = datetime.now(UTC).replace(microsecond=0)
    event = insert(
        database, key="invoice-42", status="dead", payload={"invoice": 42}, attempts=2,
        finished_at=finished, last_error="boom", dead_reason="retries_exhausted",
        due=finished - timedelta(minutes=5),
    )  # fmt: skip
    add_attempt(database, event, 1, outcome="retried", error="timeout\nafter 5s")
    add_attempt(database, event, 2, outcome="dead", error="boom")

    human = run(stack, "events", "show", str(event.id))
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    for expected in [
        f"id           {event.id}",
        "key          invoice-42",
        "type         invoice.due",
        "status       dead (retries_exhausted)",
        f"due          {format_time(event.execute_at)}",
        "attempts     2",
        "last error   boom",
        f"finished     {format_time(finished)}",
        'payload      {"invoice": 42}',
    ]:
        assert expected in lines, human.stdout
    header = lines.index(next(line for line in lines if line.startswith("ATTEMPT")))
    assert lines[header].split() == ["ATTEMPT", "STARTED", "LATENESS", "OUTCOME", "WORKER", "ERROR"]
    first, second = (line.split(None, 5) for line in lines[header + 1 :])
    assert first == ["1", format_time(event.execute_at + timedelta(milliseconds=12.5)),
                     "12.5ms", "retried", "worker-1", "timeout\\nafter 5s"]  # fmt: skip
    assert second[0::2] == ["2", "25.0ms", "worker-2"] and second[5] == "boom"

    by_key = run(stack, "events", "show", "--key", "invoice-42", "--json")
    assert by_key.exit_code == 0, by_key.output
    shown = json.loads(by_key.stdout)
    assert {k: shown[k] for k in ("id", "idempotency_key", "status", "dead_reason", "payload")} == {
        "id": str(event.id), "idempotency_key": "invoice-42", "status": "dead",
        "dead_reason": "retries_exhausted", "payload": {"invoice": 42},
    }  # fmt: skip
    assert (shown["execute_at"], shown["attempt_count"]) == (format_time(event.execute_at), 2)
    assert [
        (a["attempt"], a["outcome"], a["error"], a["worker_id"]) for a in shown["attempts"]
    ] == [
        (1, "retried", "timeout\nafter 5s", "worker-1"),
        (2, "dead", "boom", "worker-2"),
    ]
    assert shown["attempts"][0]["lateness_ms"] == 12.5

    fresh = insert(database)
    assert run(stack, "events", "show", str(fresh.id)).stdout.endswith("\nno attempts\n")


def test_show_lists_the_commands_applied_to_the_event(stack: Path, database: str) -> None:
    event = insert(database, key="moved", status="cancelled")
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    with psycopg.connect(database, autocommit=True) as conn:
        for op, due, result, before, detail in [
            ("reschedule", later, "applied", "scheduled", ""),
            ("cancel", None, "applied", "scheduled", ""),
            ("cancel", None, "not_applicable", "cancelled", "the event is cancelled"),
        ]:
            conn.execute(
                "INSERT INTO event_commands (command_id, op, event_id, idempotency_key,"
                " execute_at, requested_by, created_at, result, status_before, detail)"
                " VALUES (%s, %s, %s, 'moved', %s, 'cli:ops', now(), %s, %s, %s)",
                (uuid7(), op, event.id, due, result, before, detail),
            )

    human = run(stack, "events", "show", str(event.id))
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("APPLIED")))
    assert lines[header].split() == ["APPLIED", "COMMAND", "RESULT", "WAS", "BY", "DETAIL"]
    assert [line.split()[1:] for line in lines[header + 1 :]] == [
        ["reschedule", "to", format_time(later), "applied", "scheduled", "cli:ops", "-"],
        ["cancel", "applied", "scheduled", "cli:ops", "-"],
        ["cancel", "not_applicable", "cancelled", "cli:ops", "the", "event", "is", "cancelled"],
    ]
    shown = json.loads(run(stack, "events", "show", str(event.id), "--json").stdout)
    assert [(c["op"], c["result"], c["execute_at"]) for c in shown["history"]] == [
        ("reschedule", "applied", format_time(later)),
        ("cancel", "applied", None),
        ("cancel", "not_applicable", None),
    ]


def test_list_filters_orders_by_due_time_and_limits(stack: Path, database: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    a = insert(database, due=now + timedelta(minutes=1))
    b = insert(database, due=now + timedelta(minutes=2), type="order.placed")
    c = insert(database, due=now + timedelta(minutes=3), status="dead", finished_at=now)
    d = insert(database, due=now + timedelta(minutes=4), key="k" * 80)

    def ids(*args: str) -> list[str]:
        result = run(stack, "events", "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [e["id"] for e in json.loads(result.stdout)]

    assert ids() == [str(e.id) for e in (a, b, c, d)]
    assert ids("--status", "scheduled") == [str(e.id) for e in (a, b, d)]
    assert ids("--type", "order.placed") == [str(b.id)]
    assert ids("--limit", "2") == [str(a.id), str(b.id)]
    before, after = format_time(c.execute_at), format_time(b.execute_at)
    assert ids("--due-after", after, "--due-before", before) == [str(b.id)]
    assert ids("--due-after", (now + timedelta(minutes=2)).isoformat()) == [
        str(e.id) for e in (b, c, d)
    ]  # an offset other than Z

    listed = json.loads(run(stack, "events", "list", "--json", "--limit", "1").stdout)
    assert listed == [{
        "id": str(a.id), "idempotency_key": str(a.id), "type": "invoice.due",
        "status": "scheduled", "execute_at": format_time(a.execute_at), "attempt_count": 0,
        "late": False, "created_at": listed[0]["created_at"], "updated_at": listed[0]["updated_at"],
    }]  # fmt: skip

    human = run(stack, "events", "list")
    assert human.exit_code == 0, human.output
    header, *rows = human.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "TYPE", "DUE", "ATTEMPTS", "KEY"]
    assert rows[2].split() == [str(c.id), "dead", "invoice.due", format_time(c.execute_at),
                               "0", str(c.id)]  # fmt: skip
    assert rows[3].endswith(" " + "k" * 57 + "...")
    assert run(stack, "events", "list", "--type", "nope").stdout == "no events match\n"


# -- cancel, reschedule, retry by id or key ---------------------------------------------------


def test_commands_by_id_or_key_are_keyed_like_the_event(
    stack: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    keyed = insert(database, key="invoice-42")
    unkeyed = insert(database)
    dead = insert(database, key="dead-1", status="dead", finished_at=datetime.now(UTC))

    cancel = run(stack, "events", "cancel", str(keyed.id), "--key", str(unkeyed.id))
    assert cancel.exit_code == 0, cancel.output
    before = datetime.now(UTC)
    reschedule = run(stack, "events", "reschedule", "--key", "invoice-42", "--in", "2h")
    assert reschedule.exit_code == 0, reschedule.output
    at = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    due = at.astimezone(timezone(timedelta(hours=1))).isoformat()  # an offset other than Z
    retry = run(stack, "events", "retry", str(dead.id), "--at", due, "--json")
    assert retry.exit_code == 0, retry.output

    sent = sorted(commands(kafka_bootstrap, names.topic), key=lambda kc: kc[1].command_id)
    assert [(key, c.op, c.idempotency_key) for key, c in sent] == [
        (b"invoice-42", "cancel", "invoice-42"),
        (str(unkeyed.id).encode(), "cancel", str(unkeyed.id)),
        (b"invoice-42", "reschedule", "invoice-42"),
        (b"dead-1", "retry", "dead-1"),
    ]
    # Named by key (the key the event was recorded under), like the event's schedule.
    assert all(
        c.event_id in (None, e.id)
        for (_, c), e in zip(sent, [keyed, unkeyed, keyed, dead], strict=True)
    )
    (c1, c2, c3, c4) = (c for _, c in sent)
    assert c1.execute_at is None and c2.execute_at is None
    assert c3.execute_at is not None
    assert before + timedelta(hours=2) - timedelta(seconds=1) <= c3.execute_at
    assert c3.execute_at <= datetime.now(UTC) + timedelta(hours=2)
    assert c4.execute_at == at
    assert all(c.requested_by.startswith("cli") for c in (c1, c2, c3, c4))

    assert cancel.stdout.splitlines() == [
        f"{c1.command_id}  accepted  cancel {keyed.id}",
        f"{c2.command_id}  accepted  cancel {unkeyed.id}",
    ]
    assert reschedule.stdout == f"{c3.command_id}  accepted  reschedule {keyed.id}\n"
    assert json.loads(retry.stdout) == {
        "op": "retry", "event_id": str(dead.id), "idempotency_key": "dead-1",
        "state": "accepted", "command_id": str(c4.command_id), "reason": None,
    }  # fmt: skip


def test_a_transition_the_status_refuses_is_not_sent(
    stack: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    done = insert(database, status="succeeded", finished_at=datetime.now(UTC))
    waiting = insert(database)

    result = run(stack, "events", "cancel", str(done.id), str(waiting.id))

    assert result.exit_code == 1
    ((key, command),) = commands(kafka_bootstrap, names.topic)
    assert (key, command.op) == (waiting.key.encode(), "cancel")
    assert result.stdout.splitlines() == [
        f"{done.id}  not sent: the event is succeeded: a finished event cannot be cancelled",
        f"{command.command_id}  accepted  cancel {waiting.id}",
    ]
    refused = run(stack, "events", "retry", str(waiting.id), "--json")
    assert refused.exit_code == 1
    assert json.loads(refused.stdout)["reason"] == (
        "the event is scheduled: only a dead or cancelled event can be retried"
    )
    assert len(read_topic(kafka_bootstrap, names.topic)) == 1


# -- retry by filter ---------------------------------------------------------------------------


def test_retry_by_filter_counts_first_and_dry_run_sends_nothing(
    stack: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    old = insert(database, status="dead", finished_at=now - timedelta(hours=3))
    recent = [
        insert(database, status="dead", finished_at=now - timedelta(minutes=m)) for m in (20, 10)
    ]
    insert(database, status="dead", finished_at=now, type="other")
    insert(database, status="succeeded", finished_at=now)
    since = format_time(now - timedelta(hours=1))
    selection = ["events", "retry", "--status", "dead", "--type", "invoice.due", "--since", since]

    dry = run(stack, *selection, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines() == ["2 events match", *(str(e.id) for e in recent)]
    limited = run(stack, *selection, "--dry-run", "--limit", "1", "--json")
    assert [json.loads(line) for line in limited.stdout.splitlines()] == [
        {"matched": 2, "selected": 1, "dry_run": True},
        {"event_id": str(recent[0].id), "idempotency_key": recent[0].key, "status": "dead"},
    ]
    assert read_topic(kafka_bootstrap, names.topic) == []

    result = run(stack, *selection)
    assert result.exit_code == 0, result.output
    sent = commands(kafka_bootstrap, names.topic)
    assert sorted((key, c.op, c.idempotency_key, c.execute_at) for key, c in sent) == sorted(
        (e.key.encode(), "retry", e.key, None) for e in recent
    )
    head, *lines = result.stdout.splitlines()
    assert head == "2 events match"
    assert [line.split()[1:] for line in lines] == [
        ["accepted", "retry", str(e.id)] for e in recent
    ]
    everything = run(stack, "events", "retry", "--status", "dead", "--dry-run")
    assert everything.stdout.splitlines()[:2] == ["4 events match", str(old.id)]


def test_retry_by_filter_of_more_than_100_events_needs_yes(
    stack: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    finished = datetime.now(UTC)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (id, idempotency_key, type, payload, execute_at, status,"
            " created_at, finished_at) SELECT gen_random_uuid(), 'bulk-' || n, 'bulk', '{}',"
            " now(), 'dead', now(), %s FROM generate_series(1, 101) n",
            (finished,),
        )
        conn.execute(REGISTER_KEYS)

    refused = eventsched(stack, "events", "retry", "--status", "dead")
    assert refused.stdout == "101 events match\n"
    assert_one_line(refused, 2, "--yes: 101 events to retry: more than 100 need --yes")
    assert run(stack, "events", "retry", "--status", "dead", "--limit", "100").exit_code == 0
    assert len(read_topic(kafka_bootstrap, names.topic)) == 100

    result = run(stack, "events", "retry", "--status", "dead", "--yes")
    assert result.exit_code == 0, result.output
    sent = commands(kafka_bootstrap, names.topic)
    assert len(sent) == 201
    assert {c.idempotency_key for _, c in sent} == {f"bulk-{n}" for n in range(1, 102)}


# -- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show"], "ID/--key: give one event id or --key KEY"),
        (["show", "x", "--key", "k"], "ID/--key: give one event id or --key KEY"),
        (["show", "not-a-uuid"], "ID: 'not-a-uuid' is not an event id (a UUID)"),
        (["list", "--status", "late"], "Invalid value for '--status': 'late' is not one of"),
        (["list", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range"),
        (["list", "--due-before", "tomorrow"], "--due-before: 'tomorrow' is not an RFC 3339"),
        (["list", "--due-after", "2030-01-01T00:00:00"], "--due-after: '2030-01-01T00:00:00'"),
        (["list", "--bogus"], "No such option"),
        (["cancel"], "ID/--key: give at least one event id or --key KEY"),
        (["reschedule", str(uuid.uuid4())], "--at/--in: give exactly one of --at TIME or --in"),
        (["reschedule", str(uuid.uuid4()), "--in", "soon"], "--in: expected a duration"),
        (["reschedule", str(uuid.uuid4()), "--in", "400d"], "--in: execute_at "),
        (["reschedule", "--key", "k", "--at", "2030-01-01T00:00:00Z", "--in", "1m"],
         "--at/--in: give --at TIME or --in DURATION, not both"),
        (["retry", "--type", "t", str(uuid.uuid4())], "--type: only with --status"),
        (["retry", "--status", "dead", str(uuid.uuid4())], "--status: retry by ids/keys or by"),
        (["retry", "--status", "succeeded"], "Invalid value for '--status'"),
        (["nope"], "No such command 'nope'."),
    ],
)  # fmt: skip
def test_bad_usage_exits_2_with_one_line_before_connecting(
    tmp_path: Path, names: Names, args: list[str], message: str
) -> None:
    closed = child_sections(
        names,
        f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        f"redis://127.0.0.1:{free_port()}/0",
        f"127.0.0.1:{free_port()}",
    )
    result = eventsched(write_settings(tmp_path / "closed.toml", closed), "events", *args)
    assert_one_line(result, 2, message)
    assert result.stdout == ""


def test_an_unknown_id_or_key_exits_1_and_sends_nothing(
    stack: Path, names: Names, database: str, kafka_bootstrap: str
) -> None:
    known = insert(database)
    missing = uuid.uuid4()

    shown = eventsched(stack, "events", "show", str(missing))
    assert_one_line(shown, 1, f"no event with id {missing}")
    cancel = eventsched(stack, "events", "cancel", str(known.id), str(missing), "--key", "gone")
    assert_one_line(cancel, 1, f"no event with id {missing}, key 'gone'")
    assert cancel.stdout == ""
    assert read_topic(kafka_bootstrap, names.topic) == []


def test_unreachable_postgres_or_kafka_exits_1_with_one_line(
    tmp_path: Path, names: Names, database: str
) -> None:
    event = insert(database)
    secret = "hunter2-secret"
    down = child_sections(
        names,
        f"postgresql://postgres:{secret}@127.0.0.1:{free_port()}/none",
        "redis://127.0.0.1:1/0",
        f"127.0.0.1:{free_port()}",
    )
    no_postgres = eventsched(write_settings(tmp_path / "down.toml", down), "events", "list")
    assert_one_line(no_postgres, 1, "postgres unavailable: ")
    assert secret not in no_postgres.stderr

    no_kafka = eventsched(
        write_settings(tmp_path / "nokafka.toml", {**down, "postgres": {"dsn": database}}),
        "events", "cancel", str(event.id),
    )  # fmt: skip
    assert_one_line(no_kafka, 1, "1 of 1 message(s) not acknowledged by Kafka")
    assert no_kafka.stdout == ""
