"""Settings: precedence of sources, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.redaction import redact
from eventsched.core.runtime.settings import (
    load_settings,
    require_kafka,
    require_postgres,
    require_redis,
)
from eventsched.core.runtime.units import Duration, parse_duration


def test_defaults_match_the_documented_contract() -> None:
    s = load_settings(environ={})
    assert s.env == "development"
    assert s.kafka.topic == "events"
    assert s.kafka.dlq_topic == "events-dlq"
    assert s.kafka.partitions == 3
    assert s.producer.interval == 2.0
    assert s.executor.max_retries == 3
    assert s.shutdown.grace == 10.0
    assert s.executor_concurrency == 64  # the default (0): handlers in flight per process


def test_environment_section_then_extra_file_then_env_vars(tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text(
        '[default.kafka]\ntopic = "from-file"\npartitions = 5\n[test.producer]\ninterval = "750ms"\n'
    )
    s = load_settings(extra, environ={"EVENTSCHED_ENV": "test"})
    assert s.env == "test"
    assert s.postgres.dsn.endswith("/eventsched_test")  # from [test] in settings.toml
    assert s.kafka.topic == "from-file"
    assert s.kafka.partitions == 5
    assert s.producer.interval == 0.75
    s2 = load_settings(
        extra, environ={"EVENTSCHED_ENV": "test", "EVENTSCHED_KAFKA__PARTITIONS": "9"}
    )
    assert s2.kafka.partitions == 9
    assert s2.kafka.topic == "from-file"  # a nested env var merges, it does not replace the table


def test_contract_env_keys_override() -> None:
    env = {
        "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9093",
        "EVENTSCHED_KAFKA__TOPIC": "ev",
        "EVENTSCHED_KAFKA__DLQ_TOPIC": "ev-dlq",
        "EVENTSCHED_KAFKA__PARTITIONS": "6",
        "EVENTSCHED_POSTGRES__DSN": "postgresql://u:pw@db:5432/x",
        "EVENTSCHED_REDIS__URL": "redis://r:6379/1",
        "EVENTSCHED_HTTP__PORT": "9000",
        "EVENTSCHED_PRODUCER__INTERVAL": "500ms",
        "EVENTSCHED_EXECUTOR__CONCURRENCY": "7",
        "EVENTSCHED_TEST_POSTGRES_DSN": "ignored: test-suite variable, not a setting",
    }
    s = load_settings(environ=env)
    assert require_kafka(s) == "k1:9092,k2:9093"
    assert (s.kafka.topic, s.kafka.dlq_topic, s.kafka.partitions) == ("ev", "ev-dlq", 6)
    assert require_postgres(s) == "postgresql://u:pw@db:5432/x"
    assert require_redis(s) == ("redis://r:6379/1",)
    assert s.http.port == 9000
    assert s.producer.interval == 0.5
    assert s.executor_concurrency == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EVENTSCHED_PRODUCER__INTERVAL": "-2s"},
            "invalid setting producer.interval: expected a duration like 500ms, 2s or 1m, got '-2s'",
        ),
        (
            {"EVENTSCHED_PRODUCER__INTERVAL": "0s"},
            "invalid setting producer.interval: must be positive",
        ),
        (
            {"EVENTSCHED_PRODUCER__INTERVAL": "soon"},
            "invalid setting producer.interval: expected a duration like 500ms, 2s or 1m, got 'soon'",
        ),
        (
            {"EVENTSCHED_KAFKA__PARTITIONS": "abc"},
            "invalid setting kafka.partitions: expected `int`, got `str`",
        ),
        (
            {"EVENTSCHED_KAFKA__PARTITIONS": "0"},
            "invalid setting kafka.partitions: must be positive, got 0",
        ),
        ({"EVENTSCHED_KAFKA__TOPICS": "x"}, "invalid setting kafka.topics: unknown setting"),
        (
            {"EVENTSCHED_KAFKA__TOPIC": "bad topic!"},
            "invalid setting kafka.topic: invalid topic name 'bad topic!'",
        ),
        (
            {"EVENTSCHED_ROLEX": "1"},
            "invalid setting rolex: unknown setting (from EVENTSCHED_ROLEX or a settings file)",
        ),
        (
            {"EVENTSCHED_ENV": "staging"},
            "invalid setting env: unknown environment 'staging' (expected one of development, test, production)",
        ),
        (
            {"EVENTSCHED_LOGGING__LEVEL": "loud"},
            "invalid setting logging.level: invalid enum value 'loud'",
        ),
        (
            {"EVENTSCHED_LOGGING__FLUSH_INTERVAL": "1m"},
            "invalid setting logging.flush_interval: must be at most 10s (0: every line at once)",
        ),
        (
            {"EVENTSCHED_LOGGING__FLUSH_INTERVAL": "-1s"},
            "invalid setting logging.flush_interval: expected a duration like 500ms, 2s or 1m, got '-1s'",
        ),
        (
            {"EVENTSCHED_HTTP__PORT": "70000"},
            "invalid setting http.port: must be between 0 and 65535, got 70000",
        ),
        (
            {"EVENTSCHED_EXECUTOR__CONCURRENCY": "-1"},
            "invalid setting executor.concurrency: must not be negative (0 means 64)",
        ),
        (
            {"EVENTSCHED_EXECUTOR__SIMULATE__ERROR_RATE": "1.5"},
            "invalid setting executor.simulate.error_rate: must be between 0 and 1",
        ),
        (
            {"EVENTSCHED_PRODUCER__DELAY_MIN": "5s", "EVENTSCHED_PRODUCER__DELAY_MAX": "1s"},
            "invalid setting producer.delay_max: must be >= producer.delay_min",
        ),
        (
            {"EVENTSCHED_HANDLERS__BILLING": "nocolon"},
            "invalid setting handlers.billing: expected 'module:attr', got 'nocolon'",
        ),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("env", "check", "message"),
    [
        (
            {"EVENTSCHED_ENV": "production"},
            require_postgres,
            "invalid setting postgres.dsn: required (set EVENTSCHED_POSTGRES__DSN)",
        ),
        (
            {"EVENTSCHED_ENV": "production"},
            require_redis,
            "invalid setting redis.url: required (set EVENTSCHED_REDIS__URL, or redis.shards for several)",
        ),
        (
            {"EVENTSCHED_ENV": "production"},
            require_kafka,
            "invalid setting kafka.bootstrap_servers: required (set EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS)",
        ),
        (
            {"EVENTSCHED_POSTGRES__DSN": "nonsense"},
            require_postgres,
            "invalid setting postgres.dsn: not a PostgreSQL URL or key=value conninfo",
        ),
        (
            {"EVENTSCHED_POSTGRES__DSN": "postgresql://u:secret@h:99999/db"},
            require_postgres,
            "invalid setting postgres.dsn: cannot be parsed: Port out of range 0-65535",
        ),
        (
            {"EVENTSCHED_REDIS__URL": "http://r"},
            require_redis,
            "invalid setting redis.url: must start with redis://, rediss:// or unix://",
        ),
        (
            {"EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": "kafka"},
            require_kafka,
            "invalid setting kafka.bootstrap_servers: expected host:port[,host:port], got 'kafka'",
        ),
    ],
)
def test_required_and_malformed_addresses(env: dict[str, str], check: object, message: str) -> None:
    s = load_settings(environ=env)
    with pytest.raises(ConfigError) as info:
        check(s)  # type: ignore[operator]
    assert str(info.value) == message
    assert "secret" not in str(info.value)


def test_missing_extra_settings_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid setting --settings: file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[default.kafka\n")
    with pytest.raises(ConfigError, match=r"invalid setting settings file: cannot be read"):
        load_settings(bad, environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (3, 3.0),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    value = parse_duration(text)
    assert isinstance(value, Duration)
    assert value == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2 weeks", "-1s", "1x", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(text)


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(AttributeError):
        s.kafka.topic = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:s3cret@db:5432/x", "postgresql://user:***@db:5432/x"),
        ("redis://:pw@r:6379/0", "redis://:***@r:6379/0"),
        ("host=db password=s3cret user=u", "host=db password=*** user=u"),
        ("postgresql://user@db/x", "postgresql://user@db/x"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
