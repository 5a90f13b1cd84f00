"""Bad arguments and settings of the CLI, as a user meets them: a child process, exit 2,
one line on stderr, no traceback, and nothing connected or sent.

PostgreSQL, Redis and Kafka point at closed ports: a check that ran only after connecting
would hang or exit 1 instead of answering at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from eventsched.core.runtime.contracts import Handler, HandlerContext, handler_factory
from tests.support.cli import assert_one_line_exit_2
from tests.support.cli import offline as eventsched

# -- send: the consumer's limits, checked before sending ------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_nested(5_000), "--payload: not valid JSON (nested too deeply"),
        ('{"n": ' + "9" * 5_000 + "}", "--payload: not valid JSON (Exceeds the limit (4300"),
        ('{"n": ' + _nested(40) + "}", "--payload: payload is nested deeper than 32 levels"),
        ('{"n": ' + _nested(5_000) + "}", "--payload: not valid JSON (nested too deeply"),
        ('{"n": 1e400}', "--payload: payload contains NaN or Infinity"),
    ],
    ids=["5000-deep", "5000-digits", "deeper-than-the-consumer", "5000-deep-inside", "inf"],
)
def test_send_rejects_what_the_consumer_would_dead_letter(payload: str, message: str) -> None:
    result = eventsched("send", "--type", "t", "--in", "5m", "--payload", payload)
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""


def test_send_applies_the_consumers_size_limit() -> None:
    result = eventsched(
        "send", "--type", "t", "--in", "5m", "--payload", '{"text": "' + "x" * 600 + '"}',
        EVENTSCHED_CONSUMER__MAX_MESSAGE_BYTES="500",
    )  # fmt: skip
    assert_one_line_exit_2(result, "--payload: the event is ")
    assert "consumer.max_message_bytes (500)" in result.stderr


# -- run: plugins, handlers and the HTTP port are checked before connecting ------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "no.such.module:handler",
            "invalid plugin handlers.default = 'no.such.module:handler': cannot import module",
        ),
        (
            "tests.support.exec_handlers:CALLS",
            "invalid plugin handlers.default = 'tests.support.exec_handlers:CALLS': is not callable",
        ),
        (
            "tests.support.exec_handlers:reset",
            "invalid plugin handlers.default = 'tests.support.exec_handlers:reset': must be an async",
        ),
    ],
    ids=["missing-module", "not-callable", "not-async"],
)
def test_a_bad_handler_exits_2_before_connecting(target: str, message: str) -> None:
    result = eventsched(
        "run", "--role", "executor", "--port", "0", EVENTSCHED_HANDLERS__DEFAULT=target
    )
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""  # not even the HTTP server started


def test_a_bad_role_plugin_exits_2_before_connecting() -> None:
    result = eventsched(
        "run", "--role", "executor", "--port", "0", EVENTSCHED_PLUGINS__EXECUTOR="nope:Role"
    )
    assert_one_line_exit_2(result, "invalid plugin plugins.executor = 'nope:Role'")
    assert result.stdout == ""


TWO_SHARDS = '["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"]'


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVENTSCHED_REDIS__SHARDS": TWO_SHARDS},  # redis.url comes from the settings file
            "invalid setting redis.shards: set either redis.url (one shard) or redis.shards, not both",
        ),
        (
            {"EVENTSCHED_REDIS__URL": "", "EVENTSCHED_REDIS__SHARDS": TWO_SHARDS,
             "EVENTSCHED_EXECUTOR__SHARDS": "[2]"},
            "invalid setting executor.shards: 2 is not a shard: positions in redis.shards run"
            " from 0 to 1",
        ),
        (
            {"EVENTSCHED_REDIS__URL": "", "EVENTSCHED_REDIS__SHARDS": TWO_SHARDS,
             "EVENTSCHED_TYPES__MAIL__CONCURRENCY": "1"},
            "invalid setting types.mail.concurrency: must be at least the number of shards (2)",
        ),
    ],
    ids=["url-and-shards", "executor-shard-out-of-range", "limit-below-the-shard-count"],
)  # fmt: skip
def test_bad_shard_settings_exit_2_before_connecting(env: dict[str, str], message: str) -> None:
    result = eventsched("run", "--role", "executor", "--port", "0", **env)
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "jaeger"},
            "invalid setting OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            },
            "invalid setting OTEL_EXPORTER_OTLP_PROTOCOL: unknown protocol 'http/json'",
        ),
    ],
    ids=["exporter", "protocol"],
)
def test_a_bad_otel_variable_exits_2_naming_it(variables: dict[str, str], message: str) -> None:
    result = eventsched("run", "--role", "consumer", "--port", "0", **variables)
    assert_one_line_exit_2(result, message)
    assert result.stdout == ""
    sent = eventsched("send", "--type", "t", "--in", "5m", **variables)
    assert_one_line_exit_2(sent, message)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_an_http_port_in_use_exits_2_naming_the_option(busy_port: int) -> None:
    result = eventsched(
        "run", "--role", "consumer", "--port", str(busy_port), EVENTSCHED_HTTP__HOST="127.0.0.1"
    )
    assert_one_line_exit_2(
        result, f"invalid setting --port: cannot listen on 127.0.0.1:{busy_port}: address in use"
    )


def test_an_http_port_in_use_exits_2_naming_the_setting(busy_port: int) -> None:
    result = eventsched(
        "run", "--role", "consumer",
        EVENTSCHED_HTTP__PORT=str(busy_port), EVENTSCHED_HTTP__HOST="127.0.0.1",
    )  # fmt: skip
    assert_one_line_exit_2(
        result, f"invalid setting http.port: cannot listen on 127.0.0.1:{busy_port}: address in use"
    )


@handler_factory
def broken_factory(context: HandlerContext) -> Handler:
    """A handler factory that fails when the executor builds it (a test target)."""
    raise RuntimeError("no API token configured")


def test_a_failing_handler_factory_exits_2_with_one_line(
    database: str, redis_url: str, kafka_bootstrap: str
) -> None:
    # The factory runs when the executor role is built, once the dependencies answer.
    result = eventsched(
        "run", "--role", "executor", "--port", "0",
        EVENTSCHED_POSTGRES__DSN=database, EVENTSCHED_REDIS__URL=redis_url,
        EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        EVENTSCHED_REDIS__QUEUE=f"cli-errors-{os.getpid()}",
        EVENTSCHED_HANDLERS__DEFAULT="tests.integration.test_cli_errors:broken_factory",
    )  # fmt: skip
    assert_one_line_exit_2(
        result,
        "invalid plugin handlers.default = 'tests.integration.test_cli_errors:broken_factory': "
        "handler factory failed: RuntimeError('no API token configured')",
    )
