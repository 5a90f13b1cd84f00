"""The api role against real servers: schedule through the consumer, reads, commands on the
topic, the error table with exact status codes, pagination, stats, the OpenAPI document,
and the start-up refusals of ``eventsched run --role api``.

Roles run in this process (``tests.support.ingest.running``); the API listens on a free
port of its own, the client is httpx on trio.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from openapi_spec_validator import validate

from eventsched.core.domain.commands import COMMAND_SCHEMA_VERSION
from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime.settings import Settings
from eventsched.plugins.api.openapi import document
from tests.support.api import READER, WRITER, api_section, bearer, serving
from tests.support.cli import assert_one_line_exit_2, offline
from tests.support.clients import query, read_topic
from tests.support.eventkeys import EVENT_RETAIN_FROM
from tests.support.execution import NewEvent, insert_events, new_events
from tests.support.metrics import metric_value
from tests.support.proc import AppProcess, free_port
from tests.support.servers import Names


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


@pytest.fixture
def api_settings(make_settings: Callable[..., Settings], topics: Names) -> Callable[..., Settings]:
    def make(**sections: dict[str, Any]) -> Settings:
        return make_settings(**{**sections, "api": api_section(**sections.get("api", {}))})

    return make


def in_(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def fields(response: httpx.Response) -> set[str]:
    return {e["field"] for e in response.json().get("errors", [])}


def one(dsn: str, status: str, *, type_: str = "api.test", due: float | None = None) -> NewEvent:
    (event,) = new_events(1, due=due or datetime.now(UTC).timestamp() + 3600, type=type_)
    insert_events(dsn, [event], status=status)
    return event


# -- schedule -> consumer -> read -----------------------------------------------------------


async def test_a_scheduled_event_is_recorded_by_the_consumer_and_shown(
    api_settings: Callable[..., Settings], database: str
) -> None:
    settings = api_settings()
    async with serving(settings, ("consumer", "api")) as client:
        due = in_(3600)
        response = await client.post(
            "/v1/events",
            json={"type": "invoice.due", "payload": {"invoice": 42}, "execute_at": due},
            headers={"Idempotency-Key": "invoice-42"},
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["idempotency_key"] == "invoice-42" and body["already_known"] is False
        assert response.headers["location"] == f"/v1/events/{body['id']}"
        with trio.fail_after(30):
            while (got := await client.get(f"/v1/events/{body['id']}")).status_code == 404:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert got.status_code == 200, got.text
        event = got.json()
        assert event["id"] == body["id"] and event["status"] == "scheduled"
        assert event["type"] == "invoice.due" and event["payload"] == {"invoice": 42}
        assert event["execute_at"] == body["execute_at"]
        asked = datetime.fromisoformat(due)  # rounded up to the millisecond: never early
        assert datetime.fromisoformat(event["execute_at"]) == asked + timedelta(
            microseconds=-asked.microsecond % 1000
        )
        assert (event["attempts"], event["history"], event["attempt_count"]) == ([], [], 0)

        # The same key again, in the body this time: the recorded event, nothing produced.
        again = await client.post(
            "/v1/events",
            json={
                "type": "invoice.due",
                "payload": {"invoice": 43},
                "delay_ms": 1000,
                "idempotency_key": "invoice-42",
            },
        )
        assert again.status_code == 200, again.text
        assert again.json()["id"] == body["id"] and again.json()["already_known"] is True

        # Without a key the id is the key.
        keyless = await client.post(
            "/v1/events", json={"type": "t", "payload": {}, "delay_ms": 60_000}
        )
        assert keyless.status_code == 202
        assert keyless.json()["idempotency_key"] == keyless.json()["id"]
    produced = metric_value(
        "eventsched_api_requests_total", route="/v1/events", method="POST", status="202"
    )
    assert produced >= 2


async def test_a_batch_is_recorded_by_the_consumer_and_known_keys_are_not_sent_again(
    api_settings: Callable[..., Settings], database: str, topics: Names, kafka_bootstrap: str
) -> None:
    settings = api_settings()
    async with serving(settings, ("consumer", "api")) as client:
        first = await client.post(
            "/v1/events",
            json={
                "type": "b",
                "payload": {"n": 0},
                "delay_ms": 3_600_000,
                "idempotency_key": "batch-0",
            },
        )
        assert first.status_code == 202, first.text
        with trio.fail_after(30):
            while (await client.get(f"/v1/events/{first.json()['id']}")).status_code == 404:  # noqa: ASYNC110
                await trio.sleep(0.1)
        events = [
            {
                "type": "b",
                "payload": {"n": n},
                "delay_ms": 3_600_000,
                "idempotency_key": f"batch-{n}",
            }
            for n in range(50)
        ]
        events.append({"type": "b", "payload": {"keyless": True}, "execute_at": in_(7200)})
        response = await client.post("/v1/events/batch", json={"events": events})
        assert response.status_code == 202, response.text
        answers = response.json()["events"]
        assert [a["idempotency_key"] for a in answers[:50]] == [f"batch-{n}" for n in range(50)]
        assert answers[0] == {**answers[0], "id": first.json()["id"], "already_known": True}
        assert answers[0]["status"] == "scheduled"
        assert all(a["already_known"] is False and "error" not in a for a in answers[1:])
        assert answers[50]["idempotency_key"] == answers[50]["id"]  # keyless: the id is the key
        with trio.fail_after(30):
            while True:
                (count,) = query(database, "SELECT count(*) FROM events WHERE type = 'b'")[0]
                if count == 51:
                    break
                await trio.sleep(0.1)
        recorded = dict(
            query(database, "SELECT idempotency_key, id::text FROM events WHERE type = 'b'")
        )
        assert recorded == {a["idempotency_key"]: a["id"] for a in answers}
    # batch-0 was published once (by the single POST), every other event once.
    keys = [r.key for r in read_topic(kafka_bootstrap, topics.topic)]
    assert sorted(keys) == sorted(k.encode() for k in recorded)


async def test_a_batch_with_one_bad_event_publishes_nothing(
    api_settings: Callable[..., Settings], topics: Names, kafka_bootstrap: str
) -> None:
    async with serving(api_settings()) as client:
        good = {"type": "b", "payload": {}, "delay_ms": 1000}
        for body, named in (
            ({"events": [good, {**good, "delay_ms": -1}]}, {"events[1].delay_ms"}),
            ({"events": [good, {"payload": {}, "delay_ms": 1}]}, {"events[1].type"}),
            ({"events": [good, {**good, "extra": 1}]}, {"events[1].extra"}),
            ({"events": [good, 7]}, {"events[1]"}),
            (
                {"events": [{**good, "idempotency_key": "k"}, {**good, "idempotency_key": "k"}]},
                {"events[1].idempotency_key"},
            ),
            ({"events": []}, {"events"}),
            ({"events": [good] * 501}, {"events"}),
            ({"events": [good], "more": 1}, {"more"}),
            ([good], {"body"}),
        ):
            response = await client.post("/v1/events/batch", json=body)
            assert response.status_code == 422, (body, response.text)
            assert fields(response) == named, response.text
        keyed = await client.post(
            "/v1/events/batch", json={"events": [good]}, headers={"Idempotency-Key": "k"}
        )
        assert keyed.status_code == 422 and fields(keyed) == {"Idempotency-Key"}
        reader = await client.post(
            "/v1/events/batch", json={"events": [good]}, headers=bearer(READER)
        )
        assert reader.status_code == 403
    assert read_topic(kafka_bootstrap, topics.topic) == []


async def test_an_event_with_attempts_shows_them(
    api_settings: Callable[..., Settings], database: str
) -> None:
    event = one(database, "dead")
    query(
        database,
        "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at, finished_at,"
        " lateness_ms, outcome, error, worker_id, event_retain_from) VALUES"
        f" (%s, 1, now(), now(), now(), 2.5, 'retried', 'boom', 'w1', {EVENT_RETAIN_FROM}),"
        f" (%s, 2, now(), now(), now(), 4.0, 'dead', 'boom again', 'w1', {EVENT_RETAIN_FROM})"
        " RETURNING 1",
        (event.id, event.id, event.id, event.id),
    )
    async with serving(api_settings(), token=READER) as client:
        got = (await client.get(f"/v1/events/{event.id}")).json()
    assert [
        (a["attempt"], a["lateness_ms"], a["outcome"], a["error"]) for a in got["attempts"]
    ] == [
        (1, 2.5, "retried", "boom"),
        (2, 4.0, "dead", "boom again"),
    ]
    assert got["status"] == "dead"


# -- commands -------------------------------------------------------------------------------


async def test_a_cancel_through_the_api_is_applied_and_listed_in_the_history(
    api_settings: Callable[..., Settings], database: str
) -> None:
    async with serving(api_settings(), ("consumer", "api")) as client:
        scheduled = await client.post(
            "/v1/events",
            json={"type": "invoice.due", "payload": {}, "execute_at": in_(3600)},
            headers={"Idempotency-Key": "cancel-me"},
        )
        assert scheduled.status_code == 202, scheduled.text
        event_id = scheduled.json()["id"]
        with trio.fail_after(30):
            while (await client.get(f"/v1/events/{event_id}")).status_code == 404:  # noqa: ASYNC110
                await trio.sleep(0.1)
        cancel = await client.post(f"/v1/events/{event_id}/cancel")
        assert cancel.status_code == 202, cancel.text
        with trio.fail_after(30):
            got = (await client.get(f"/v1/events/{event_id}")).json()
            while got["status"] != "cancelled":
                await trio.sleep(0.1)
                got = (await client.get(f"/v1/events/{event_id}")).json()
    (entry,) = got["history"]
    assert entry["command_id"] == cancel.json()["command_id"]
    assert (entry["op"], entry["result"], entry["status_before"]) == (
        "cancel",
        "applied",
        "scheduled",
    )
    assert entry["requested_by"] == "writer" and entry["execute_at"] is None
    assert datetime.fromisoformat(entry["applied_at"]) >= datetime.fromisoformat(
        entry["created_at"]
    )


async def test_commands_go_to_the_topic_or_are_refused_by_status(
    api_settings: Callable[..., Settings], database: str, kafka_bootstrap: str, names: Names
) -> None:
    scheduled, running_, succeeded, dead = (
        one(database, s) for s in ("scheduled", "running", "succeeded", "dead")
    )
    query(
        database,
        "UPDATE events SET idempotency_key = 'key-of-scheduled' WHERE id = %s RETURNING 1",
        (scheduled.id,),
    )
    async with serving(api_settings()) as client:
        accepted = []
        for path, body in (
            (f"{scheduled.id}/cancel", None),
            (f"{scheduled.id}/reschedule", {"execute_at": in_(7200)}),
            (f"{running_.id}/cancel", None),
            (f"{dead.id}/retry", None),
            (f"{dead.id}/retry", {"delay_ms": 5000}),
        ):
            response = await client.post(f"/v1/events/{path}", json=body)
            assert response.status_code == 202, (path, response.text)
            assert response.json()["state"] == "accepted"
            accepted.append(response.json()["command_id"])
        refused = {
            f"{succeeded.id}/cancel": None,
            f"{running_.id}/reschedule": {"delay_ms": 1000},
            f"{dead.id}/reschedule": {"delay_ms": 1000},
            f"{scheduled.id}/retry": None,
            f"{succeeded.id}/retry": None,
        }
        for path, body in refused.items():
            response = await client.post(f"/v1/events/{path}", json=body)
            assert response.status_code == 409, (path, response.text)
            assert (
                response.json()["error"] == "refused"
                and "the event is" in response.json()["message"]
            )
    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, names.topic)
    values = [json.loads(r.value) for r in records]
    assert [v["command_id"] for v in values] == accepted
    assert [v["op"] for v in values] == ["cancel", "reschedule", "cancel", "retry", "retry"]
    assert records[0].key == b"key-of-scheduled" and values[0]["event_id"] == scheduled.id
    assert values[0]["requested_by"] == "writer"
    assert "execute_at" not in values[3] and "execute_at" in values[4]
    assert all(
        dict(r.headers)["schema-version"] == str(COMMAND_SCHEMA_VERSION).encode() for r in records
    )


# -- the error table ------------------------------------------------------------------------


async def test_the_error_table(api_settings: Callable[..., Settings], database: str) -> None:
    settings = api_settings(consumer={"max_message_bytes": 4096, "horizon": "30d"})
    succeeded = one(database, "succeeded")
    valid = {"type": "t", "payload": {}, "delay_ms": 1000}
    nested: Any = {}
    for _ in range(40):
        nested = {"a": nested}
    post_cases: list[tuple[str, Any, int, set[str]]] = [
        ("bad json", b"{not json", 422, {"body"}),
        ("not an object", b"[1, 2]", 422, {"body"}),
        ("empty body", b"", 422, {"body"}),
        ("missing fields", {"delay_ms": 5}, 422, {"type", "payload"}),
        ("missing due time", {"type": "t", "payload": {}}, 422, {"execute_at"}),
        (
            "bad types",
            {"type": 5, "payload": [], "delay_ms": "x"},
            422,
            {"type", "payload", "delay_ms"},
        ),
        ("unknown field", {**valid, "colour": "red"}, 422, {"colour"}),
        ("both due times", {**valid, "execute_at": in_(60)}, 422, {"execute_at", "delay_ms"}),
        ("negative delay", {**valid, "delay_ms": -1}, 422, {"delay_ms"}),
        (
            "no offset",
            {"type": "t", "payload": {}, "execute_at": "2030-01-01T00:00:00"},
            422,
            {"execute_at"},
        ),
        ("beyond horizon", {**valid, "delay_ms": 31 * 86_400_000}, 422, {"execute_at"}),
        (
            "too old",
            {"type": "t", "payload": {}, "execute_at": "2000-01-01T00:00:00Z"},
            422,
            {"execute_at"},
        ),
        ("too deep", {**valid, "payload": nested}, 422, {"payload"}),
        ("empty type", {**valid, "type": ""}, 422, {"type"}),
        ("NUL in key", {**valid, "idempotency_key": "a\u0000b"}, 422, {"idempotency_key"}),
        ("too large", {**valid, "payload": {"x": "y" * 5000}}, 413, set()),
    ]
    async with serving(settings) as client:
        for name, body, status, bad in post_cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = await client.post(
                "/v1/events", content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == status, (name, response.text)
            assert response.headers["content-type"] == "application/json", name
            assert fields(response) == bad, (name, response.text)
            assert response.json()["message"], name

        mismatch = await client.post(
            "/v1/events", json={**valid, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
        )
        assert (mismatch.status_code, fields(mismatch)) == (422, {"idempotency_key"})

        unknown = uuid.uuid4()
        for method, path, status in (
            ("GET", f"/v1/events/{unknown}", 404),
            ("GET", "/v1/events/not-a-uuid", 404),
            ("POST", f"/v1/events/{unknown}/cancel", 404),
            ("POST", f"/v1/events/{unknown}/retry", 404),
            ("GET", "/v1/nothing", 404),
            ("PUT", "/v1/events", 405),
            ("POST", f"/v1/events/{succeeded.id}/cancel", 409),
        ):
            response = await client.request(method, path)
            assert response.status_code == status, (method, path, response.text)
            assert response.json()["error"], (method, path)

        reschedule = await client.post(
            f"/v1/events/{succeeded.id}/reschedule", json={"delay_ms": 40 * 86_400_000}
        )
        assert (reschedule.status_code, fields(reschedule)) == (422, {"execute_at"})
        no_due = await client.post(f"/v1/events/{succeeded.id}/reschedule", json={})
        assert (no_due.status_code, fields(no_due)) == (422, {"execute_at"})
        cancel_body = await client.post(f"/v1/events/{succeeded.id}/cancel", json={"x": 1})
        assert (cancel_body.status_code, fields(cancel_body)) == (422, {"x"})

        for query_string, bad in (
            ("limit=0", {"limit"}),
            ("limit=501", {"limit"}),
            ("limit=abc", {"limit"}),
            ("status=bogus", {"status"}),
            ("cursor=garbage", {"cursor"}),
            ("due_after=yesterday", {"due_after"}),
            ("sort=id", {"sort"}),
        ):
            response = await client.get(f"/v1/events?{query_string}")
            assert (response.status_code, fields(response)) == (422, bad), query_string

        # Authentication: no token, a wrong one, a read-only one writing.
        anonymous = {"Authorization": ""}
        for method, path in (("GET", "/v1/stats"), ("POST", "/v1/events"), ("GET", "/v1/events")):
            for headers in (
                anonymous,
                bearer("wrong-token-0123456789abcdef"),
                {"Authorization": WRITER},
            ):
                response = await client.request(method, path, json=valid, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
        as_reader = bearer(READER)
        for path in ("/v1/events", f"/v1/events/{succeeded.id}/cancel"):
            response = await client.post(path, json=valid, headers=as_reader)
            assert response.status_code == 403, (path, response.text)
            assert "reader" in response.json()["message"]
        assert (await client.get("/v1/stats", headers=as_reader)).status_code == 200
        assert (await client.get("/v1/openapi.json", headers=anonymous)).status_code == 200
    text = (await trio.to_thread.run_sync(_metrics_text)).decode()
    assert WRITER not in text and READER not in text
    assert 'route="/v1/events/{id}"' in text and 'route="unmatched"' in text


def _metrics_text() -> bytes:
    from eventsched.core.runtime import metrics

    return metrics.render()


async def test_a_broker_that_does_not_acknowledge_is_503_with_retry_after(
    api_settings: Callable[..., Settings], database: str
) -> None:
    closed = free_port()
    settings = api_settings(
        kafka={"bootstrap_servers": f"127.0.0.1:{closed}"}, api={"produce_timeout": "1s"}
    )
    scheduled = one(database, "scheduled")
    async with serving(settings) as client:
        for path, body in (
            ("/v1/events", {"type": "t", "payload": {}, "delay_ms": 1000}),
            ("/v1/events", {"type": "t", "payload": {}, "delay_ms": 1000, "idempotency_key": "k"}),
            (f"/v1/events/{scheduled.id}/cancel", None),
            ("/v1/events/batch", {"events": [{"type": "t", "payload": {}, "delay_ms": 1000}]}),
        ):
            response = await client.post(path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"] == "kafka_unavailable"
        assert (await client.get(f"/v1/events/{scheduled.id}")).status_code == 200


async def test_postgres_down_is_503_with_retry_after(
    api_settings: Callable[..., Settings],
) -> None:
    closed = free_port()
    settings = api_settings(
        postgres={"dsn": f"postgresql://postgres@127.0.0.1:{closed}/none", "connect_timeout": "1s"}
    )
    async with serving(settings) as client:
        for path in (f"/v1/events/{uuid.uuid4()}", "/v1/events", "/v1/stats"):
            response = await client.get(path)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"] == "postgres_unavailable"
        keyed = await client.post(
            "/v1/events", json={"type": "t", "payload": {}, "delay_ms": 1, "idempotency_key": "k"}
        )
        assert keyed.status_code == 503


# -- list, stats, OpenAPI -------------------------------------------------------------------


async def test_pages_walk_every_event_once_in_due_order(
    api_settings: Callable[..., Settings], database: str
) -> None:
    base = datetime.now(UTC).timestamp() + 600
    # Ties on execute_at: the id breaks them, so no row is repeated or skipped.
    events = new_events(23, due=lambda i: base + (i // 4))
    insert_events(database, events)
    others = new_events(5, due=base + 1, type="other")
    insert_events(database, others, status="dead")
    async with serving(api_settings(), token=READER) as client:
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"limit": "5", "type": "test.event", **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/v1/events", params=params)).json()
            seen += page["events"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 5
        assert [e["id"] for e in seen] == [
            e.id for e in sorted(events, key=lambda e: (e.execute_at, uuid.UUID(e.id)))
        ]
        dead = (await client.get("/v1/events", params={"status": "dead"})).json()
        assert {e["id"] for e in dead["events"]} == {e.id for e in others}
        assert dead["next_cursor"] is None
        window = {
            "due_after": datetime.fromtimestamp(base + 1, UTC).isoformat(),
            "due_before": datetime.fromtimestamp(base + 3, UTC).isoformat(),
            "type": "test.event",
        }
        in_window = (await client.get("/v1/events", params=window)).json()["events"]
        assert len(in_window) == 8


async def test_stats_count_by_status_and_type(
    api_settings: Callable[..., Settings], database: str
) -> None:
    now = datetime.now(UTC).timestamp()
    insert_events(database, new_events(3, due=now + 600, type="a"))
    overdue = new_events(2, due=lambda i: now - 60 - i * 60, type="b")
    insert_events(database, overdue)
    insert_events(database, new_events(4, due=now - 600, type="a"), status="succeeded")
    async with serving(api_settings()) as client:
        stats = (await client.get("/v1/stats")).json()
    assert stats["total"] == 9
    assert stats["by_status"] == {
        "scheduled": 5, "running": 0, "retrying": 0, "succeeded": 4, "dead": 0, "cancelled": 0
    }  # fmt: skip
    assert stats["by_type"] == {"a": 7, "b": 2}
    oldest = stats["oldest_overdue"]
    assert oldest["id"] == overdue[1].id and oldest["type"] == "b"
    assert 110 < oldest["overdue_seconds"] < 200


async def test_the_openapi_document_validates_and_names_every_route(
    api_settings: Callable[..., Settings],
) -> None:
    async with serving(api_settings(), token="") as client:
        served = (await client.get("/v1/openapi.json")).json()
    validate(served)
    assert served == json.loads(json.dumps(document(1_048_576, 500, 500)))
    assert set(served["paths"]) == {
        "/v1/events",
        "/v1/events/batch",
        "/v1/events/{id}",
        "/v1/events/{id}/cancel",
        "/v1/events/{id}/reschedule",
        "/v1/events/{id}/retry",
        "/v1/stats",
        "/v1/openapi.json",
        "/v1/schedules",
        "/v1/schedules/{name}",
        "/v1/schedules/{name}/pause",
        "/v1/schedules/{name}/resume",
        "/v1/schedules/{name}/next",
    }


# -- eventsched run --role api --------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, 'invalid setting api.tokens: required with api.auth = "token"'),
        (
            {"EVENTSCHED_API__AUTH": "none", "EVENTSCHED_API__HOST": "0.0.0.0"},
            'invalid setting api.auth: "none" is allowed only with a loopback api.host',
        ),
        (
            {"EVENTSCHED_API__TOKENS": '[{name = "ci", token_file = "/nonexistent/token"}]'},
            "invalid setting api.tokens[0].token_file: cannot read /nonexistent/token",
        ),
        (
            {"EVENTSCHED_API__TOKENS": '[{name = "ci", token = "short"}]'},
            "invalid setting api.tokens[0]: token of 'ci' is shorter than 16 characters",
        ),
    ],
    ids=["no-tokens", "none-on-public-host", "missing-token-file", "short-token"],
)
def test_run_role_api_refuses_to_start_with_one_line(env: dict[str, str], message: str) -> None:
    result = offline("run", "--role", "api", "--port", "0", **env)
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""


def test_run_role_api_serves_and_never_logs_a_token(
    tmp_path: Path, database: str, kafka_bootstrap: str, topics: Names
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(WRITER + "\n")
    app = AppProcess(
        ["run", "--role", "api", "--port", "0"],
        env={
            "EVENTSCHED_POSTGRES__DSN": database,
            "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "EVENTSCHED_KAFKA__TOPIC": topics.topic,
            "EVENTSCHED_API__PORT": "0",
            "EVENTSCHED_API__TOKENS": f'[{{name = "ci", token_file = "{token_file}"}}]',
        },
    )
    try:
        port = app.wait_event("api_listening")["port"]
        base = f"http://127.0.0.1:{port}"
        wrong = httpx.get(f"{base}/v1/stats", headers=bearer(READER), timeout=30)
        assert wrong.status_code == 401
        body = {"type": "t", "payload": {}, "delay_ms": 1000}
        ok = httpx.post(f"{base}/v1/events", json=body, headers=bearer(WRITER), timeout=30)
        assert ok.status_code == 202, ok.text
        assert httpx.get(f"{base}/v1/stats", headers=bearer(WRITER), timeout=30).status_code == 200
    finally:
        assert app.stop() == 0, app.tail()
    output = "".join(app.raw)
    assert WRITER not in output and READER not in output
    assert "api_stopped" in output
