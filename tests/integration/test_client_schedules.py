""":class:`eventsched.ScheduleClient` and :class:`eventsched.AsyncScheduleClient` against the
api role (in this process) and PostgreSQL: every method, its errors, and the checks it makes
before sending."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio

from eventsched import AsyncScheduleClient, ScheduleApiError, ScheduleClient
from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime.settings import Settings
from tests.support.api import READER, WRITER, api_section, serving
from tests.support.clients import query
from tests.support.servers import Names


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, names: Names
) -> Settings:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return make_settings(api=api_section())  # type: ignore[no-any-return]


def calls(base_url: str, database: str) -> None:
    """Every method, blocking (run in a worker thread beside the API)."""
    with ScheduleClient(base_url, WRITER) as client:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        added = client.add("quarter", type="report", every=timedelta(minutes=15), start=start,
                           payload={"k": 1}, misfire="run_all", misfire_limit=3)  # fmt: skip
        assert added["every"] == "15m" and added["start"] == "2026-01-01T00:00:00.000Z"
        client.add("lord-howe", type="t", cron="45 1 * * *", timezone="Australia/Lord_Howe")
        assert [s["name"] for s in client.list_all()] == ["lord-howe", "quarter"]
        assert client.get("quarter")["misfire_limit"] == 3
        assert client.pause("quarter")["paused"] is True
        assert client.resume("quarter")["paused"] is False
        # Lord Howe falls back 30 minutes on 5 April 2026: 01:45 happens twice, runs once.
        times = client.next("lord-howe", 2, after=datetime(2026, 4, 4, 12, tzinfo=UTC))
        assert times == [
            datetime(2026, 4, 5, 1, 45, tzinfo=timezone(timedelta(hours=11))),
            datetime(2026, 4, 6, 1, 45, tzinfo=timezone(timedelta(hours=10, minutes=30))),
        ]
        assert client.delete("quarter") == []  # nothing was materialised

        with pytest.raises(ScheduleApiError) as missing:
            client.get("quarter")
        assert missing.value.status == 404 and missing.value.error == "not_found"
        with pytest.raises(ScheduleApiError) as taken:
            client.add("lord-howe", type="t", every="1h")
        assert taken.value.status == 409
        with pytest.raises(ValueError, match=r"^cron: "):  # checked here, nothing sent
            client.add("bad", type="t", cron="every day")
    with ScheduleClient(base_url, READER) as reader, pytest.raises(ScheduleApiError) as denied:
        reader.add("mine", type="t", every="1s")
    assert denied.value.status == 403
    assert query(database, "SELECT name FROM schedules") == [("lord-howe",)]


async def test_every_method_through_the_api(settings: Settings, database: str) -> None:
    async with serving(settings):
        url = f"http://127.0.0.1:{settings.api.port}"
        await trio.to_thread.run_sync(calls, url, database)


async def test_the_async_client_on_trio(settings: Settings, database: str) -> None:
    async with (
        serving(settings),
        AsyncScheduleClient(f"http://127.0.0.1:{settings.api.port}", WRITER) as client,
    ):
        await client.add("tick", type="t", every="1s", paused=True)
        assert (await client.get("tick"))["paused"] is True
        assert (await client.resume("tick"))["paused"] is False
        assert (await client.pause("tick"))["paused"] is True
        assert [s["name"] for s in await client.list_all()] == ["tick"]
        after = datetime(2026, 1, 1, tzinfo=UTC)
        assert await client.next("tick", 2, after=after) == [
            after + timedelta(seconds=1),
            after + timedelta(seconds=2),
        ]
        assert await client.delete("tick") == []
        with pytest.raises(ScheduleApiError) as missing:
            await client.delete("tick")
        assert missing.value.status == 404
    assert query(database, "SELECT count(*) FROM schedules") == [(0,)]
