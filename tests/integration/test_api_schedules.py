"""The api role's recurring schedules against real servers: add, list, show, pause, resume,
next, delete (its cancels on the topic), and the error table (401, 403, 404, 409, 422 per
field). The api role runs in this process; no executor is needed (definitions are rows)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventsched.core.domain.schedules import occurrence_key
from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime.settings import Settings
from tests.support.api import READER, api_section, serving
from tests.support.clients import query, read_topic
from tests.support.servers import Names

NIGHTLY = {"name": "nightly", "type": "report", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


@pytest.fixture
def settings(make_settings: Callable[..., Settings], topics: Names) -> Settings:
    return make_settings(api=api_section())  # type: ignore[no-any-return]


async def test_add_show_list_pause_resume_and_next(settings: Settings, database: str) -> None:
    async with serving(settings) as client:
        added = await client.post("/v1/schedules", json={**NIGHTLY, "payload": {"a": 1}})
        assert added.status_code == 201, added.text
        assert added.headers["location"] == "/v1/schedules/nightly"
        body = added.json()
        assert body["source"] == "api" and body["paused"] is False and body["every"] is None
        again = await client.post("/v1/schedules", json=NIGHTLY)
        assert again.status_code == 409 and again.json()["error"] == "exists"

        every = {"name": "tick", "type": "t", "every": "15m"}
        assert (await client.post("/v1/schedules", json=every)).status_code == 201
        listed = (await client.get("/v1/schedules")).json()["schedules"]
        assert [s["name"] for s in listed] == ["nightly", "tick"]
        assert listed[1]["every"] == "15m"
        shown = (await client.get("/v1/schedules/nightly")).json()
        assert shown["payload"] == {"a": 1} and shown["materialised_through"] is None

        paused = await client.post("/v1/schedules/nightly/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        resumed = (await client.post("/v1/schedules/nightly/resume")).json()
        assert resumed["paused"] is False
        assert resumed["materialised_through"] is not None  # the paused time is skipped

        # Berlin springs forward on 29 March 2026: 02:30 does not exist that night.
        nxt = await client.get(
            "/v1/schedules/nightly/next", params={"count": 3, "from": "2026-03-28T00:00:00Z"}
        )
        assert nxt.json() == {
            "name": "nightly",
            "timezone": "Europe/Berlin",
            "occurrences": [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00",
            ],
        }
    rows = query(database, "SELECT name, source, every_ms FROM schedules ORDER BY name")
    assert rows == [("nightly", "api", None), ("tick", "api", 900_000)]


async def test_the_error_table(settings: Settings, database: str) -> None:
    query(
        database,
        "INSERT INTO schedules (name, type, every_ms, source) VALUES ('filed', 't', 1000, 'settings')",
    )
    async with serving(settings) as client:
        bad = await client.post(
            "/v1/schedules",
            json={"name": "x y", "every": "soon", "misfire": "never", "colour": "red"},
        )
        assert bad.status_code == 422
        assert {e["field"] for e in bad.json()["errors"]} == {
            "name", "type", "every", "misfire", "colour",
        }  # fmt: skip
        both = await client.post("/v1/schedules", json={**NIGHTLY, "every": "1h"})
        assert both.status_code == 422 and both.json()["errors"][0]["field"] == "cron"
        assert (await client.post("/v1/schedules", content=b"[1]")).status_code == 422
        assert (await client.get("/v1/schedules/none")).status_code == 404
        assert (await client.post("/v1/schedules/none/pause")).status_code == 404
        assert (await client.delete("/v1/schedules/none")).status_code == 404
        assert (await client.get("/v1/schedules/none/next")).status_code == 404
        nxt = await client.get("/v1/schedules/filed/next", params={"count": "many", "to": "1"})
        assert nxt.status_code == 422
        assert {e["field"] for e in nxt.json()["errors"]} == {"count", "to"}
        filed = await client.delete("/v1/schedules/filed")
        assert filed.status_code == 409 and filed.json()["error"] == "from_settings"
        anonymous = await client.get("/v1/schedules", headers={"Authorization": ""})
        assert anonymous.status_code == 401
        reader = {"Authorization": f"Bearer {READER}"}
        assert (await client.get("/v1/schedules", headers=reader)).status_code == 200
        assert (await client.post("/v1/schedules", json=NIGHTLY, headers=reader)).status_code == 403
        assert (await client.delete("/v1/schedules/filed", headers=reader)).status_code == 403
    assert query(database, "SELECT name FROM schedules") == [("filed",)]


async def test_delete_publishes_a_cancel_for_each_materialised_future_occurrence(
    settings: Settings, database: str, kafka_bootstrap: str, names: Names
) -> None:
    """The watermark 10 s ahead of an every-2s schedule: the occurrences after now up to it
    were materialised; the delete sends a cancel for each, keyed like its event."""
    now = datetime.now(UTC)
    through = datetime.fromtimestamp(int(now.timestamp()) // 2 * 2 + 10, UTC)
    query(
        database,
        "INSERT INTO schedules (name, type, every_ms, source, materialised_through)"
        " VALUES ('doomed', 't', 2000, 'api', %s)",
        [through],
    )
    async with serving(settings) as client:
        before = datetime.now(UTC)
        deleted = await client.delete("/v1/schedules/doomed")
        after = datetime.now(UTC)
    assert deleted.status_code == 200, deleted.text
    keys = deleted.json()["cancelled"]
    published = [through - timedelta(seconds=2 * i) for i in range(5, -1, -1)]
    # The API's "now" lies between before and after (seconds on a loaded machine): every
    # occurrence after it is cancelled, none before it.
    assert [occurrence_key("doomed", t) for t in published if t > after] == keys[
        len(keys) - sum(t > after for t in published) :
    ]
    assert keys == [occurrence_key("doomed", t) for t in published if t > before][-len(keys) :]
    assert len(keys) >= sum(t > after for t in published) >= 3
    records = read_topic(kafka_bootstrap, names.topic)
    commands: list[dict[str, Any]] = [json.loads(r.value or b"{}") for r in records]
    assert [c["op"] for c in commands] == ["cancel"] * len(keys)
    assert [c["idempotency_key"] for c in commands] == keys
    assert [r.key for r in records] == [k.encode() for k in keys]
    assert query(database, "SELECT count(*) FROM schedules") == [(0,)]
