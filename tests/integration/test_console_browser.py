"""The web console in a real browser (headless Chromium through selenium, see
tests/support/browser.py) against the api and consumer roles on real servers: log in, see
the forecast, find an event with the filters, cancel it, retry a dead one, pause a schedule;
a screenshot of every page (the directory is printed); no error in the browser's console (a
CSP violation would be one) and htmx loaded from the package.

The browser runs in a worker thread while the roles serve on this test's trio loop.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime.settings import Settings
from tests.support.api import WRITER, api_section
from tests.support.browser import chromium, require_browser, screenshot_dir, wait_for
from tests.support.clients import query
from tests.support.eventkeys import EVENT_RETAIN_FROM
from tests.support.execution import insert_events, new_events
from tests.support.ingest import running
from tests.support.servers import Names


@pytest.fixture
def topics(kafka_bootstrap: str, names: Names) -> Names:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})
    return names


def seed(dsn: str) -> dict[str, Any]:
    """Invoices and e-mails due soon, two dead reports, a past hour of attempts, a schedule."""
    now = datetime.now(UTC)
    invoices = new_events(5, due=lambda i: (now + timedelta(minutes=10 + 10 * i)).timestamp(),
                          type="invoice.due")  # fmt: skip
    emails = new_events(5, due=(now + timedelta(minutes=5)).timestamp(), type="email.send")
    # The forecast's shape: a steady trickle and a peak two hours ahead.
    trickle = new_events(
        300, due=lambda i: (now + timedelta(minutes=(i * 7) % 355 + 1)).timestamp(),
        type="reminder.send",
    )  # fmt: skip
    peak = new_events(
        90, due=lambda i: (now + timedelta(minutes=115 + i % 15, seconds=i)).timestamp(),
        type="reminder.send",
    )  # fmt: skip
    insert_events(dsn, invoices + emails + trickle + peak)
    for i, e in enumerate(invoices):
        query(dsn, "UPDATE events SET idempotency_key = %s WHERE id = %s RETURNING 1",
              (f"invoice-{i}", e.id))  # fmt: skip
    dead = new_events(2, due=(now - timedelta(minutes=30)).timestamp(), type="report.build")
    insert_events(dsn, dead, status="dead", attempts=3, dead_reason="retries_exhausted",
                  finished_at=now - timedelta(minutes=20), last_error="HTTP 503 from reports")  # fmt: skip
    done = new_events(
        40, due=lambda i: (now - timedelta(minutes=55 - i)).timestamp(), type="email.send"
    )
    insert_events(dsn, done, status="succeeded", attempts=1)
    rows = [(e.id, 1, 40 + (i * 37) % 200, 55 - i, "succeeded") for i, e in enumerate(done)]
    rows += [(e.id, a, 15.0 * a, 20 + 5 * a, "retried" if a < 3 else "dead")
             for e in dead for a in (1, 2, 3)]  # fmt: skip
    for event_id, attempt, lateness, ago, outcome in rows:
        query(
            dsn,
            "INSERT INTO event_attempts (event_id, attempt, scheduled_for, started_at,"
            " finished_at, lateness_ms, outcome, error, worker_id, event_retain_from) VALUES"
            " (%s, %s, now() - make_interval(mins => %s), now() - make_interval(mins => %s),"
            " now() - make_interval(mins => %s), %s, %s, %s, 'executor-1', "
            + EVENT_RETAIN_FROM + ") RETURNING 1",
            (event_id, attempt, ago, ago, ago, lateness, outcome,
             "HTTP 503 from reports" if outcome != "succeeded" else None, event_id),
        )  # fmt: skip
    query(dsn, "INSERT INTO schedules (name, type, cron, timezone, payload, source)"
               " VALUES ('nightly-report', 'report.build', '0 2 * * *', 'Europe/Berlin', '{}',"
               " 'api') RETURNING 1")  # fmt: skip
    return {"invoices": invoices, "dead": dead}


def status_of(dsn: str, event_id: str) -> str:
    ((status,),) = query(dsn, "SELECT status FROM events WHERE id = %s", (event_id,))
    return str(status)


def scenario(base: str, dsn: str, seeded: dict[str, Any], shots: Path) -> list[str]:
    """The browser's part (blocking, in a worker thread); returns the screenshots taken."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import Select, WebDriverWait

    taken: list[str] = []
    with chromium() as driver:

        def shot(name: str) -> None:
            """The whole page: the window is made as tall as the page for the picture."""
            path = shots / f"{name}.png"
            size = driver.get_window_size()
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(size["width"], min(int(height) + 200, 4000))
            try:
                assert driver.save_screenshot(str(path)), name
            finally:
                driver.set_window_size(size["width"], size["height"])
            taken.append(path.name)

        def click(by: str, value: str) -> None:
            """Click a link or a button and wait for the next page to replace this one."""
            element = driver.find_element(by, value)
            element.click()
            WebDriverWait(driver, 30).until(staleness_of(element))

        def text(css: str) -> str:
            return str(driver.find_element(By.CSS_SELECTOR, css).text)

        # Log in: every page leads to the form first.
        driver.get(f"{base}/ui/events")
        assert "/ui/login" in driver.current_url
        shot("01-login")
        driver.find_element(By.ID, "token").send_keys("wrong-token-0123456789")
        click(By.ID, "login")
        assert "not one of" in text("#login-failed")
        driver.find_element(By.ID, "token").send_keys(WRITER)
        click(By.ID, "login")
        assert driver.current_url == f"{base}/ui/events"  # back where it was going

        # The overview: counts, the last hour and the forecast.
        click(By.LINK_TEXT, "Overview")
        summary = text("#forecast-summary")
        assert summary.startswith("400 events due in the next 6 h"), summary
        assert len(driver.find_elements(By.CSS_SELECTOR, "#forecast-chart rect")) > 300
        hour_bars = driver.find_elements(By.CSS_SELECTOR, "#hour-chart rect")
        assert len(hour_bars) == 61  # every minute of the last hour, then this one
        assert sum(float(b.get_attribute("height")) > 0 for b in hour_bars) == 40
        assert "2 dead events" in text("#dlq-size")
        assert driver.execute_script("return typeof window.htmx") == "object"
        # The refresh htmx does every 15 s, now: the section comes back from the server.
        driver.execute_script("document.getElementById('forecast-summary').id = 'old-summary'")
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "htmx.ajax('GET', '/ui/?hours=6', {target: '#live', select: '#live',"
            " swap: 'outerHTML'}).then(() => done(true));"
        )
        assert text("#forecast-summary").startswith("400 events due")
        assert driver.find_elements(By.ID, "old-summary") == []
        shot("02-overview")

        # Find an event with the filters, cancel it.
        click(By.LINK_TEXT, "Events")
        Select(driver.find_element(By.ID, "f-status")).select_by_value("scheduled")
        driver.find_element(By.ID, "f-type").send_keys("invoice.due")
        click(By.ID, "apply")
        links = driver.find_elements(By.CSS_SELECTOR, "#events a.event-link")
        assert [a.text for a in links] == [e.id for e in seeded["invoices"]]
        shot("03-events-filtered")
        target = seeded["invoices"][2].id
        click(By.LINK_TEXT, target)
        assert text("#status") == "scheduled" and "invoice-2" in text("#fields")
        shot("04-event")
        click(By.ID, "cancel")
        assert text("#notice").startswith("cancel sent")

        def cancelled() -> bool:
            driver.refresh()
            return text("#status") == "cancelled"

        wait_for(cancelled, what="the cancel to be applied")
        assert "applied, see the history" in text("#notice")
        assert "cancel" in text("#history") and "writer" in text("#history")
        assert driver.find_elements(By.ID, "cancel") == []
        shot("05-event-cancelled")

        # Retry a dead one from the dead letters.
        click(By.LINK_TEXT, "Dead letters")
        click(By.LINK_TEXT, "retries_exhausted")
        shot("06-dead-letters")
        dead_id = seeded["dead"][0].id
        click(By.LINK_TEXT, dead_id)
        assert text("#status") == "dead"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#attempts tr")) == 4  # header + 3
        click(By.ID, "retry")
        assert text("#notice").startswith("retry sent")

        def retried() -> bool:
            driver.refresh()
            return text("#status") == "scheduled"

        wait_for(retried, what="the retry to be applied")
        shot("07-event-retried")

        # Pause a schedule.
        click(By.LINK_TEXT, "Schedules")
        shot("08-schedules")
        click(By.XPATH, "//button[text()='Pause']")
        assert text("#notice") == "schedule paused."

        # Nothing went wrong in the page: no CSP violation, no script error.
        wrong_login = (
            f"{base}/ui/login - Failed to load resource: the server responded with a status of 401"
        )
        problems = [
            e
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not e["message"].startswith(wrong_login)
        ]
        assert problems == [], "\n".join(e["message"] for e in problems)
        # Logging out ends the session.
        click(By.XPATH, "//button[text()='Log out']")
        driver.get(f"{base}/ui/")
        assert "/ui/login" in driver.current_url
    assert status_of(dsn, target) == "cancelled" and status_of(dsn, dead_id) == "scheduled"
    return taken


async def test_an_operator_works_through_the_console_in_a_browser(
    make_settings: Callable[..., Settings],
    topics: Names,
    database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_browser()
    seeded = seed(database)
    settings = make_settings(api=api_section())
    shots = screenshot_dir(tmp_path_factory)
    async with running(settings, ("consumer", "api")):
        taken = await trio.to_thread.run_sync(
            scenario, f"http://127.0.0.1:{settings.api.port}", database, seeded, shots
        )
    assert taken == [
        "01-login.png", "02-overview.png", "03-events-filtered.png", "04-event.png",
        "05-event-cancelled.png", "06-dead-letters.png", "07-event-retried.png",
        "08-schedules.png",
    ]  # fmt: skip
    assert all((shots / name).stat().st_size > 10_000 for name in taken)
    print(f"console screenshots: {shots}")
    assert (await trio.to_thread.run_sync(query, database, "SELECT paused FROM schedules")) == [
        (True,)
    ]
