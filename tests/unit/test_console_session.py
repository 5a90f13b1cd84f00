"""The web console's signed session cookie, CSRF tokens, same-site rule, redirects and the
forecast chart's grouping (pure functions; the HTTP side is tests/integration/test_console.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from eventsched.core.store.overview import Forecast
from eventsched.plugins.api.auth import Tokens
from eventsched.plugins.api.console import MAX_BARS, _safe_next, forecast_bars
from eventsched.plugins.api.session import (
    LOGIN_FORM_SECONDS,
    SESSION_SECONDS,
    Sessions,
    same_origin,
)

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


def tokens(**extra: tuple[str, bool]) -> Tokens:
    return Tokens({WRITER: ("writer", False), READER: ("reader", True), **extra})


def test_a_login_gives_a_cookie_without_the_token_that_names_the_caller() -> None:
    sessions = Sessions(tokens())
    assert sessions.login("wrong-token-0123456789abcdef") is None
    assert sessions.login("") is None
    logged_in = sessions.login(READER)
    assert logged_in is not None
    caller, cookie = logged_in
    assert (caller.name, caller.read_only) == ("reader", True)
    assert READER not in cookie
    session = sessions.check(cookie)
    assert session is not None and session.caller == caller
    assert session.expires - time.time() <= SESSION_SECONDS


def test_a_cookie_is_no_session_when_forged_expired_or_its_token_is_gone() -> None:
    sessions = Sessions(tokens())
    logged_in = sessions.login(WRITER)
    assert logged_in is not None
    _, cookie = logged_in
    payload, mac = cookie.split(".")
    assert sessions.check(None) is None and sessions.check("") is None
    assert (
        sessions.check(f"{payload}.{mac[:-1]}A" if mac[-1] != "A" else f"{payload}.{mac[:-1]}B")
        is None
    )
    assert sessions.check(payload) is None and sessions.check(f"{payload}.{mac}.x") is None
    assert sessions.check("!!.??") is None
    assert sessions.check(cookie, now=time.time() + SESSION_SECONDS + 5) is None
    # Another process with the same tokens accepts it (no server-side state)...
    assert Sessions(tokens()).check(cookie) is not None
    # ...not once the token named "writer" is another one.
    other = Sessions(Tokens({"another-token-0123456789abcdef": ("writer", False)}))
    assert other.check(cookie) is None
    # A cookie of one name does not pass as another's.
    reader = sessions.login(READER)
    assert reader is not None
    assert sessions.check(f"{reader[1].split('.')[0]}.{mac}") is None


def test_csrf_tokens_belong_to_their_session() -> None:
    sessions = Sessions(tokens())
    first, second = sessions.login(WRITER), sessions.login(WRITER)
    assert first is not None and second is not None
    one, two = sessions.check(first[1]), sessions.check(second[1])
    assert one is not None and two is not None
    assert sessions.csrf_ok(one, sessions.csrf(one))
    assert not sessions.csrf_ok(one, sessions.csrf(two))
    assert not sessions.csrf_ok(one, None) and not sessions.csrf_ok(one, "")


def test_login_form_tokens_are_this_process_s_and_expire() -> None:
    sessions = Sessions(tokens())
    token = sessions.login_form_token()
    assert sessions.login_form_ok(token)
    assert not Sessions(tokens()).login_form_ok(token)
    assert not sessions.login_form_ok(token, now=time.time() + LOGIN_FORM_SECONDS + 5)
    assert not sessions.login_form_ok(None) and not sessions.login_form_ok("12.x")


def test_without_auth_any_login_works_and_sessions_are_the_process_s() -> None:
    sessions = Sessions(None)
    logged_in = sessions.login("")
    assert logged_in is not None and logged_in[0].name == ""
    assert sessions.check(logged_in[1]) is not None
    assert Sessions(None).check(logged_in[1]) is None


def test_same_origin() -> None:
    assert same_origin(None, None, "127.0.0.1:8084")
    assert same_origin("http://127.0.0.1:8084", "same-origin", "127.0.0.1:8084")
    assert not same_origin("http://evil.example", None, "127.0.0.1:8084")
    assert not same_origin("null", None, "127.0.0.1:8084")
    assert not same_origin(None, "cross-site", "127.0.0.1:8084")
    assert not same_origin(None, "same-site", "127.0.0.1:8084")
    assert not same_origin("http://127.0.0.1:8084", None, None)


def test_only_console_paths_are_followed_after_a_login() -> None:
    assert _safe_next("/ui/events?status=dead") == "/ui/events?status=dead"
    for target in (None, "", "https://evil.example/", "//evil.example/ui/", "/v1/events",
                   "/ui\\..\\x"):  # fmt: skip
        assert _safe_next(target) == "/ui/"


def test_the_forecast_chart_groups_minutes_into_at_most_max_bars() -> None:
    now = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
    start = now.replace(second=0)
    minutes = ((start + timedelta(minutes=1), 4), (start + timedelta(minutes=2), 6))
    chart, group = forecast_bars(Forecast(1, 0, minutes), now)
    assert group == 1 and len(chart) <= 62
    assert [b.label for b in chart if b.height > 0] == ["12:01Z: 4", "12:02Z: 6"]
    assert max(b.height for b in chart) == 120
    long = ((start + timedelta(hours=47), 3), (start + timedelta(hours=47, minutes=3), 2))
    chart, group = forecast_bars(Forecast(48, 0, long), now)
    assert group == 8 and len(chart) <= MAX_BARS + 1
    assert [b.label.split(": ")[1] for b in chart if b.height > 0] == ["5"]
