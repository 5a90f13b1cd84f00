"""Secrets never reach logs, /readyz bodies or error messages."""

from __future__ import annotations

import io
import logging

import pytest
import structlog
import trio
from structlog.testing import capture_logs

from eventsched.core.runtime.errors import ConfigError, DependencyError
from eventsched.core.runtime.health import Health
from eventsched.core.runtime.logs import configure_logging, get_logger
from eventsched.core.runtime.redaction import compile_secret_paths, redact, redact_url
from eventsched.core.runtime.settings import build_settings, require_postgres
from eventsched.core.store.pool import Database
from eventsched.plugins.executor.attempt import failure_text

SECRET = "s3cr3t-pw"


async def test_readyz_body_and_logs_redact_a_dsn_in_a_dependency_error() -> None:
    health = Health(check_timeout=1)

    async def failing() -> None:
        raise DependencyError("postgres", f"cannot connect to postgresql://app:{SECRET}@db:5432/x")

    health.add_check("postgres", failing)
    with capture_logs() as logs:
        await health.run_checks()
    ready, body = health.readiness()
    assert not ready
    assert SECRET not in str(body)
    assert "postgresql://app:***@db:5432/x" in body["dependencies"]["postgres"]
    assert logs and all(SECRET not in str(entry) for entry in logs)


async def test_a_real_connection_failure_message_carries_no_password() -> None:
    import trio_asyncio

    # Nothing listens on port 9 (discard): the pool fails to connect and times out. Refused
    # connections fail at once, so a short pool timeout gives the same error as a long one.
    dsn = f"postgresql://app:{SECRET}@127.0.0.1:9/x"
    async with trio_asyncio.open_loop():
        db = await Database.open(dsn, connect_timeout=0.2)
        try:
            with pytest.raises(DependencyError) as info:
                await db.ping()
        finally:
            with trio.move_on_after(5):
                await db.close()
    assert SECRET not in str(info.value)


# -- URLs and DSNs in any text -----------------------------------------------------------------

TOKEN = "T0KENabcdefghijklmnopqrstuv"  # a path part of 27 token characters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"POST https://user:{SECRET}@hooks.example.com/x: HTTP 503",
            "POST https://user:***@hooks.example.com/x: HTTP 503",
        ),
        (f"POST https://{SECRET}@h.example/x", "POST https://***@h.example/x"),
        (
            f"POST http://h:8080/a?token={SECRET}&mode=x#frag{SECRET}: boom",
            "POST http://h:8080/a?token=***&mode=***#***: boom",
        ),
        (f"GET http://h/a?{SECRET}", "GET http://h/a?***"),
        (f"POST https://hooks.slack.com/services/T0/B0/{TOKEN}", "POST https://hooks.slack.com/services/T0/B0/***"),
        # An unencoded @ in the password: everything up to the last @ is userinfo.
        (f"to postgresql://app:pa@{SECRET}@db:5432/x failed", "to postgresql://app:***@db:5432/x failed"),
        (f"to postgresql://app:pa/{SECRET}@db:5432/x failed", "to postgresql://app:***@db:5432/x failed"),
        (f"host=db password={SECRET} dbname=x", "host=db password=*** dbname=x"),
        (f"host=db password='a {SECRET} b' dbname=x", "host=db password=*** dbname=x"),
        ("redis://127.0.0.1:6379/0 unreachable", "redis://127.0.0.1:6379/0 unreachable"),
        ("no url here", "no url here"),
    ],
)  # fmt: skip
def test_redact_removes_userinfo_query_values_token_paths_and_passwords(
    text: str, expected: str
) -> None:
    assert redact(text) == expected


def test_configured_secret_path_patterns_hide_shorter_path_parts() -> None:
    patterns = compile_secret_paths([r"k-[0-9]+"])
    assert (
        redact_url("https://h.example/hook/k-42/go?a=1", patterns)
        == "https://h.example/hook/***/go?a=***"
    )
    assert (
        redact("see https://h.example/hook/k-42/go", patterns)
        == "see https://h.example/hook/***/go"
    )


def test_a_dsn_whose_password_holds_an_unencoded_at_is_refused_without_echoing_it() -> None:
    settings = build_settings({"postgres": {"dsn": f"postgresql://app:pa@{SECRET}@db:5432/x"}})
    with pytest.raises(ConfigError) as info:
        require_postgres(settings)
    assert info.value.key == "postgres.dsn"
    assert "%40" in str(info.value)
    assert SECRET not in str(info.value) and "pa@" not in str(info.value)


def test_log_lines_are_redacted_whatever_logs_them() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        get_logger("test").warning(
            "request_failed", error=f"POST https://u:{SECRET}@h.example/a?token={SECRET}"
        )
        logging.getLogger("somelib").warning("cannot reach https://u:%s@h.example/", SECRET)
        try:
            raise RuntimeError(f"boom at https://h.example/x?key={SECRET}")
        except RuntimeError:
            get_logger("test").exception("crashed")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = []
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert SECRET not in stream.getvalue()
    assert "https://u:***@h.example/a?token=***" in lines[0]


def test_handler_errors_are_described_without_secrets() -> None:
    err = RuntimeError(f"cannot reach https://u:{SECRET}@h.example/services/{TOKEN}?sig={SECRET}")
    assert (
        failure_text(err)
        == "RuntimeError: cannot reach https://u:***@h.example/services/***?sig=***"
    )


def test_a_consumer_dead_letter_error_carries_no_secret() -> None:
    from datetime import UTC, datetime

    from eventsched.core.domain.deadletter import dlq_headers

    headers = dict(
        dlq_headers(
            reason="invalid_json",
            error="cannot use https://user:hunter2@hooks.example/x?token=s3cr3t",
            source_topic="events",
            source_partition=0,
            source_offset=1,
            source_timestamp_ms=None,
            consumer_id="c",
            failed_at=datetime.now(UTC),
        )
    )
    error = headers["dlq-error"]
    assert isinstance(error, bytes) and error.startswith(b"cannot use ")
    assert b"hunter2" not in error and b"s3cr3t" not in error
    assert b"hooks.example" in error
