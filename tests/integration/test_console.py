"""The web console at HTTP level against real servers: no cookie without a login, the
session cookie's flags, CSRF and same-site checks on every POST, the Content-Security-Policy
on every answer, read-only tokens, and what the pages show from PostgreSQL (counts, the
last hour's lateness, the forecast, dead events by reason, schedules).

The browser tests are tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio

from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime.settings import Settings
from eventsched.plugins.api.session import COOKIE
from tests.support.api import READER, WRITER, api_section
from tests.support.clients import query, read_topic
from tests.support.eventkeys import EVENT_RETAIN_FROM
from tests.support.execution import NewEvent, insert_events, new_events
from tests.support.ingest import running
from tests.support.metrics import metric_value
from tests.support.servers import Names


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


@pytest.fixture
def console_settings(
    make_settings: Callable[..., Settings], topics: Names
) -> Callable[..., Settings]:
    def make(**api: Any) -> Settings:
        return make_settings(api=api_section(**api))

    return make


@asynccontextmanager
async def console(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The api role in this process; a client without a token or a cookie."""
    async with (
        running(settings, ("api",)),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api.port}", timeout=30) as client,
    ):
        yield client


def one(dsn: str, status: str, **columns: Any) -> NewEvent:
    (event,) = new_events(1, due=datetime.now(UTC).timestamp() + 3600, type="console.test")
    insert_events(dsn, [event], status=status, **columns)
    return event


def hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found is not None, f"no hidden field {name}"
    return found.group(1)


async def log_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    form = await client.get("/ui/login")
    return await client.post(
        "/ui/login",
        data={"csrf": hidden(form.text, "csrf"), "next": "/ui/", "token": token},
    )


def assert_secured(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"


def inline_scripts(html: str) -> list[str]:
    """Script elements with a body, and inline event handler attributes."""
    bodies = [m for m in re.findall(r"<script[^>]*>(.*?)</script>", html, re.S) if m.strip()]
    handlers = re.findall(r"\son[a-z]+\s*=", html)
    return bodies + handlers


async def test_nothing_without_a_login_and_no_cookie_until_one(
    console_settings: Callable[..., Settings], database: str
) -> None:
    event = one(database, "scheduled")
    async with console(console_settings()) as client:
        for path in ("/ui/", "/ui/events", f"/ui/events/{event.id}", "/ui/dead", "/ui/schedules"):
            response = await client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/ui/login?next=")
            assert "set-cookie" not in response.headers
            assert_secured(response)
        # A bearer token is not a console session.
        response = await client.get("/ui/", headers={"Authorization": f"Bearer {WRITER}"})
        assert response.status_code == 303
        login = await client.get("/ui/login")
        assert login.status_code == 200 and "set-cookie" not in login.headers
        assert_secured(login)
        assert inline_scripts(login.text) == []
        # A POST without a session changes nothing, and sets nothing.
        post = await client.post(f"/ui/events/{event.id}/cancel", data={"csrf": "x"})
        assert post.status_code == 403 and "set-cookie" not in post.headers
        wrong = await log_in(client, "not-a-token-0123456789")
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert "not one of" in wrong.text
        assert not client.cookies


async def test_without_auth_a_click_logs_in_and_the_session_is_this_process_s(
    console_settings: Callable[..., Settings], database: str
) -> None:
    settings = console_settings(auth="none", tokens=[])
    async with console(settings) as client:
        bare = await client.get("/ui")
        assert bare.status_code == 308 and bare.headers["location"] == "/ui/"
        assert (await client.get("/ui/")).status_code == 303
        form = await client.get("/ui/login")
        assert 'name="token"' not in form.text
        response = await client.post("/ui/login", data={"csrf": hidden(form.text, "csrf")})
        assert response.status_code == 303 and "httponly" in response.headers["set-cookie"].lower()
        page = await client.get("/ui/")
        assert page.status_code == 200 and 'no auth (api.auth = "none")' in page.text
        value = client.cookies[COOKIE]
    async with console(console_settings(auth="none", tokens=[])) as client:
        client.cookies.set(COOKIE, value, path="/ui/")
        assert (await client.get("/ui/")).status_code == 303  # a restart ends it


async def test_login_sets_a_signed_httponly_strict_cookie_without_the_token(
    console_settings: Callable[..., Settings], database: str
) -> None:
    async with console(console_settings()) as client:
        response = await log_in(client, WRITER)
        assert response.status_code == 303 and response.headers["location"] == "/ui/"
        cookie = response.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "samesite=strict" in cookie.lower() and "path=/ui/" in cookie.lower()
        assert "secure" not in attributes  # plain http: see docs/console.md
        value = client.cookies[COOKIE]
        assert WRITER not in value and WRITER not in cookie
        page = await client.get("/ui/")
        assert page.status_code == 200 and "token <b>writer</b>" in page.text
        assert_secured(page)
        assert inline_scripts(page.text) == []
        # A forged cookie (another name in the signed part) is no session.
        payload, mac = value.split(".")
        client.cookies.clear()
        client.cookies.set(COOKIE, payload[:-2] + "xx." + mac, path="/ui/")
        assert (await client.get("/ui/")).status_code == 303
        # Logging out removes the cookie.
        client.cookies.clear()
        await log_in(client, WRITER)
        page = await client.get("/ui/")
        out = await client.post("/ui/logout", data={"csrf": hidden(page.text, "csrf")})
        assert out.status_code == 303 and f"{COOKIE}=" in out.headers["set-cookie"]
        assert (await client.get("/ui/")).status_code == 303


async def test_a_cookie_of_a_removed_token_is_no_session(
    console_settings: Callable[..., Settings], database: str
) -> None:
    port_settings = console_settings()
    async with console(port_settings) as client:
        await log_in(client, WRITER)
        value = client.cookies[COOKIE]
    others = console_settings(
        tokens=[{"name": "writer", "token": "another-token-0123456789abcdef"}],
    )
    async with console(others) as client:
        client.cookies.set(COOKIE, value, path="/ui/")
        assert (await client.get("/ui/")).status_code == 303
    # The same tokens in another process (a restart, another replica): still a session.
    async with console(port_settings) as client:
        client.cookies.set(COOKIE, value, path="/ui/")
        assert (await client.get("/ui/")).status_code == 200


async def test_every_post_needs_the_csrf_token_and_the_same_site(
    console_settings: Callable[..., Settings], database: str, kafka_bootstrap: str, names: Names
) -> None:
    event = one(database, "scheduled")
    async with console(console_settings()) as client:
        await log_in(client, WRITER)
        page = await client.get(f"/ui/events/{event.id}")
        assert page.status_code == 200
        csrf = hidden(page.text, "csrf")
        path = f"/ui/events/{event.id}/cancel"
        assert (await client.post(path)).status_code == 403
        assert (await client.post(path, data={"csrf": csrf[:-2] + "xx"})).status_code == 403
        cross = await client.post(
            path, data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert cross.status_code == 403
        site = await client.post(
            path, data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert site.status_code == 403
        # A login form from another site is refused too (login CSRF).
        form = await client.get("/ui/login")
        evil_login = await client.post(
            "/ui/login",
            data={"csrf": "1." + "x" * 43, "token": WRITER},
        )
        assert evil_login.status_code == 403
        assert form.status_code in (200, 303)
        # Nothing was sent so far; now the right token from this origin.
        origin = f"http://127.0.0.1:{client.base_url.port}"
        done = await client.post(path, data={"csrf": csrf}, headers={"Origin": origin})
        assert done.status_code == 303, done.text
        assert done.headers["location"].startswith(f"/ui/events/{event.id}?sent=cancel")
        shown = await client.get(done.headers["location"])
        assert "cancel sent" in shown.text
    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, names.topic)
    values = [json.loads(r.value) for r in records]
    assert [(v["op"], v["event_id"], v["requested_by"]) for v in values] == [
        ("cancel", event.id, "writer")
    ]


async def test_a_read_only_token_sees_pages_without_buttons_and_cannot_post(
    console_settings: Callable[..., Settings], database: str, kafka_bootstrap: str, names: Names
) -> None:
    event = one(database, "dead", dead_reason="retries_exhausted", finished_at=datetime.now(UTC))
    async with console(console_settings()) as client:
        await log_in(client, READER)
        page = await client.get(f"/ui/events/{event.id}")
        assert page.status_code == 200 and "(read-only)" in page.text
        assert 'id="retry"' not in page.text
        response = await client.post(
            f"/ui/events/{event.id}/retry", data={"csrf": hidden(page.text, "csrf")}
        )
        assert response.status_code == 403 and "read-only" in response.text
        dead = await client.get("/ui/dead")
        assert 'class="replay"' not in dead.text
    assert await trio.to_thread.run_sync(read_topic, kafka_bootstrap, names.topic) == []


async def test_refusals_and_bad_forms_are_pages_with_the_api_s_words(
    console_settings: Callable[..., Settings], database: str
) -> None:
    done = one(database, "succeeded", finished_at=datetime.now(UTC))
    scheduled = one(database, "scheduled")
    async with console(console_settings()) as client:
        await log_in(client, WRITER)
        csrf = hidden((await client.get("/ui/")).text, "csrf")
        refused = await client.post(f"/ui/events/{done.id}/cancel", data={"csrf": csrf})
        assert refused.status_code == 409
        assert "a finished event cannot be cancelled" in refused.text
        missing = await client.post(f"/ui/events/{scheduled.id}/reschedule", data={"csrf": csrf})
        assert missing.status_code == 422 and "at: required" in missing.text
        bad = await client.post(
            f"/ui/events/{scheduled.id}/reschedule", data={"csrf": csrf, "in": "soon"}
        )
        assert bad.status_code == 422 and "in: " in bad.text
        unknown = await client.get(f"/ui/events/{uuid.uuid4()}")
        assert unknown.status_code == 404 and "no event with this id" in unknown.text
        assert_secured(unknown)
        filters = await client.get("/ui/events", params={"status": "bogus"})
        assert filters.status_code == 422 and "status: must be one of" in filters.text


async def test_the_pages_show_counts_lateness_forecast_dead_letters_and_schedules(
    console_settings: Callable[..., Settings], database: str
) -> None:
    now = datetime.now(UTC)
    soon = new_events(7, due=lambda i: (now + timedelta(minutes=10 + i % 2)).timestamp())
    insert_events(database, soon)
    (overdue,) = new_events(1, due=(now - timedelta(seconds=90)).timestamp(), type="late")
    insert_events(database, [overdue])
    dead = [
        one(database, "dead", dead_reason=reason, finished_at=now, last_error="boom")
        for reason in ("retries_exhausted", "retries_exhausted", "permanent_error")
    ]
    for attempt, lateness in enumerate((10.0, 20.0, 30.0), 1):
        query(
            database,
            "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
            " finished_at, lateness_ms, outcome, worker_id, event_retain_from)"
            " VALUES (%s, %s, now(), now(), now(), %s, 'succeeded', 'w-1', "
            + EVENT_RETAIN_FROM
            + ") RETURNING 1",
            (dead[0].id, attempt, lateness, dead[0].id),
        )
    query(
        database,
        "INSERT INTO schedules (name, type, every_ms, timezone, payload, source,"
        " definition_hash) VALUES ('nightly', 'report', 60000, 'UTC', '{}', 'api', 'h')"
        " RETURNING 1",
    )
    async with console(console_settings()) as client:
        await log_in(client, WRITER)
        page = await client.get("/ui/", params={"hours": "2"})
        assert page.status_code == 200, page.text
        text = re.sub(r"\s+", " ", page.text)
        assert re.search(
            r"<th><a href=\"/ui/events\?status=scheduled\">scheduled</a></th><td>8<", text
        )
        by_type = re.search(r'id="by-type">(.*?)</table>', text)
        assert by_type is not None
        assert re.findall(r">([a-z.]+)</a></th><td>(\d+)<", by_type.group(1)) == [
            ("test.event", "7"),
            ("late", "1"),
        ]  # pending only: not the dead console.test events
        assert "<b>7</b> events due in the next 2 h" in text
        assert "<b>1</b> scheduled events are already past due" in text
        assert len(re.findall(r"<rect ", page.text)) >= 2
        assert f'href="/ui/events/{overdue.id}"' in page.text
        assert "lateness p50</th><td>20.0 ms" in text and "lateness max</th><td>30.0 ms" in text
        assert "<b>3</b> dead events" in text
        bad_hours = await client.get("/ui/", params={"hours": "99"})
        assert bad_hours.status_code == 422

        listed = await client.get("/ui/events", params={"status": "dead"})
        assert sorted(
            re.findall(r'class="event-link" href="/ui/events/([^"]+)"', listed.text)
        ) == sorted(e.id for e in dead)
        by_reason = await client.get("/ui/dead", params={"reason": "retries_exhausted"})
        assert by_reason.status_code == 200
        assert re.search(r"retries_exhausted</a></td><td>2<", by_reason.text)
        assert {dead[0].id, dead[1].id} <= set(
            re.findall(r'href="/ui/events/([^"]+)"', by_reason.text)
        )
        assert dead[2].id not in by_reason.text

        schedules = await client.get("/ui/schedules")
        assert "nightly" in schedules.text and "every 1m" in schedules.text
        csrf = hidden(schedules.text, "csrf")
        paused = await client.post("/ui/schedules/nightly/pause", data={"csrf": csrf})
        assert paused.status_code == 303
        assert query(database, "SELECT paused FROM schedules WHERE name = 'nightly'") == [(True,)]
        shown = await client.get(paused.headers["location"])
        assert "schedule paused" in shown.text and "Resume" in shown.text

        # Every page: the policy, and nothing inline for it to refuse.
        for shown_page in (page, listed, by_reason, schedules, shown):
            assert_secured(shown_page)
            assert inline_scripts(shown_page.text) == []
        one_event = await client.get(f"/ui/events/{dead[0].id}")
        assert one_event.status_code == 200 and "20.0 ms" in one_event.text
        assert inline_scripts(one_event.text) == [] and "w-1" in one_event.text

        static = await client.get("/ui/static/htmx.min.js")
        assert static.status_code == 200 and "javascript" in static.headers["content-type"]
        assert_secured(static)
    # Counted like the API's requests, by the route's template.
    for route, status in (("/ui/events/{id}", "200"), ("/ui/", "200"), ("/ui/", "422")):
        counted = metric_value(
            "eventsched_api_requests_total", route=route, method="GET", status=status
        )
        assert counted >= 1, route


async def test_paging_walks_every_event_once(
    console_settings: Callable[..., Settings], database: str
) -> None:
    now = datetime.now(UTC).timestamp()
    events = new_events(120, due=lambda i: now + 600 + i, type="paged")
    insert_events(database, events)
    seen: list[str] = []
    async with console(console_settings()) as client:
        await log_in(client, WRITER)
        url: str | None = "/ui/events?type=paged"
        while url is not None:
            page = await client.get(url)
            assert page.status_code == 200
            seen += re.findall(r'class="event-link" href="/ui/events/([^"]+)"', page.text)
            found = re.search(r'<a href="([^"]+)" id="next-page">', page.text)
            url = found.group(1).replace("&amp;", "&") if found else None
    assert seen == [e.id for e in events]


async def test_replay_retries_the_dead_events_of_one_reason(
    console_settings: Callable[..., Settings], database: str, kafka_bootstrap: str, names: Names
) -> None:
    now = datetime.now(UTC)
    exhausted = [
        one(database, "dead", dead_reason="retries_exhausted", finished_at=now) for _ in range(3)
    ]
    other = one(database, "dead", dead_reason="no_handler", finished_at=now)
    async with console(console_settings()) as client:
        await log_in(client, WRITER)
        page = await client.get("/ui/dead")
        response = await client.post(
            "/ui/dead/replay",
            data={"csrf": hidden(page.text, "csrf"), "reason": "retries_exhausted", "limit": "2"},
        )
        assert response.status_code == 303, response.text
        shown = await client.get(response.headers["location"])
        assert "Retry sent for 2 dead events" in shown.text
    records = await trio.to_thread.run_sync(read_topic, kafka_bootstrap, names.topic)
    values = [json.loads(r.value) for r in records]
    assert [v["op"] for v in values] == ["retry", "retry"]
    assert {v["event_id"] for v in values} <= {e.id for e in exhausted}
    assert other.id not in {v["event_id"] for v in values}
