"""Per-type policies: the [types] settings, their errors, and how a type's policy resolves."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventsched.core.domain.jobcontract import SAQ_TIMEOUT_MARGIN, saq_timeout
from eventsched.core.domain.policies import LEASE_MARGIN, Policies, resolve
from eventsched.core.jobqueue.limits import Lane
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.sections import RetryBackoffSettings
from eventsched.core.runtime.settings import Settings, load_settings

TYPES = """
[default.handlers]
default = "pkg.mod:fallback"
"user.created" = "pkg.mod:users"

[default.executor]
max_retries = 4
job_timeout = "30s"

[default.executor.retry_backoff]
base = "1s"
factor = 2.0
max = "60s"
jitter = 0.2

[default.types.default]
handler = "pkg.mod:typed_default"
max_retries = 6
priority = 1

[default.types.default.retry_backoff]
max = "10s"

[default.types."order.placed"]
handler = "pkg.mod:orders"
timeout = "5s"
concurrency = 2
priority = 7

[default.types."order.placed".retry_backoff]
base = "250ms"

[default.types."mail.sent"]
rate = 5
burst = 1
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "types.toml"
    path.write_text(TYPES)
    return load_settings(path, environ={})


def test_a_type_inherits_key_by_key_from_its_own_table_then_the_defaults(
    settings: Settings,
) -> None:
    orders = resolve(settings, "order.placed")
    assert orders.handler == "pkg.mod:orders"
    assert orders.handler_key == 'types."order.placed".handler'
    assert orders.timeout == 5.0
    assert orders.max_retries == 6  # types.default beats executor.max_retries
    # retry_backoff merges per key: own base, types.default's max, executor's factor/jitter.
    assert orders.retry_backoff == RetryBackoffSettings(base=0.25, factor=2.0, max=10.0, jitter=0.2)
    assert (orders.concurrency, orders.rate, orders.priority) == (2, 0.0, 7)


def test_handlers_is_shorthand_for_a_types_handler_and_beats_the_default(
    settings: Settings,
) -> None:
    users = resolve(settings, "user.created")
    assert users.handler == "pkg.mod:users"
    assert users.handler_key == "handlers.user.created"
    assert users.timeout == 30.0  # executor.job_timeout
    assert users.priority == 1  # types.default
    unknown = resolve(settings, "never.configured")
    assert unknown.handler == "pkg.mod:typed_default"  # types.default beats handlers.default
    assert not unknown.limited


def test_without_types_every_type_uses_handlers_and_executor() -> None:
    s = load_settings(environ={"EVENTSCHED_HANDLERS__X": "pkg.mod:x"})
    policy = resolve(s, "x")
    assert policy.handler == "pkg.mod:x"
    assert policy.max_retries == s.executor.max_retries
    assert policy.retry_backoff == s.executor.retry_backoff
    assert policy.timeout == s.executor.job_timeout
    assert (policy.concurrency, policy.rate, policy.priority) == (0, 0.0, 0)
    assert Policies(s).lanes == ()


def test_rate_defaults_its_burst_to_one_second_of_starts() -> None:
    s = load_settings(environ={"EVENTSCHED_TYPES__FAST__RATE": "20.5"})
    assert resolve(s, "fast").burst == 20
    s = load_settings(environ={"EVENTSCHED_TYPES__SLOW__RATE": "0.2"})
    assert resolve(s, "slow").burst == 1


def test_lanes_are_the_named_types_with_limits_or_their_own_priority(
    settings: Settings,
) -> None:
    policies = Policies(settings)
    assert set(policies.lanes) == {
        Lane("order.placed", priority=7, concurrency=2, lease=5.0 + LEASE_MARGIN),
        Lane("mail.sent", priority=1, rate=5.0, burst=1, lease=30.0 + LEASE_MARGIN),
    }
    assert policies.lane_of("order.placed") == "order.placed"
    assert policies.lane_of("user.created") == ""  # default priority, no limit
    assert policies.lane_of(None) == ""


def test_the_saq_timeout_outlasts_the_longest_type_timeout(tmp_path: Path) -> None:
    path = tmp_path / "long.toml"
    path.write_text('[default.types.report]\ntimeout = "10m"\n')
    assert saq_timeout(load_settings(path, environ={})) == 600 + SAQ_TIMEOUT_MARGIN


def test_an_environment_variable_names_a_lower_case_type() -> None:
    s = load_settings(environ={"EVENTSCHED_TYPES__WEBHOOK__CONCURRENCY": "3"})
    assert s.types["webhook"].concurrency == 3


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[default.types."order.placed"]\nrate = "fast"\n',
            'invalid setting types."order.placed".rate: expected `float | null`, got `str`',
        ),
        (
            '[default.types."order.placed"]\nrate = -1\n',
            'invalid setting types."order.placed".rate: must not be negative (0: no limit)',
        ),
        (
            '[default.types."order.placed"]\nconcurency = 2\n',
            'invalid setting types."order.placed".concurency: unknown setting',
        ),
        (
            '[default.types."order.placed".retry_backoff]\njitter = 2\n',
            'invalid setting types."order.placed".retry_backoff.jitter: must be between 0 and 1',
        ),
        (
            '[default.types."order.placed".retry_backoff]\nbse = "1s"\n',
            'invalid setting types."order.placed".retry_backoff.bse: unknown setting',
        ),
        (
            "[default.types.mail]\nburst = 3\n",
            "invalid setting types.mail.burst: needs a rate (starts per second)",
        ),
        (
            '[default.types.mail]\ntimeout = "soon"\n',
            "invalid setting types.mail.timeout: expected a duration like 500ms, 2s or 1m,"
            " got 'soon'",
        ),
        (
            '[default.types.mail]\nhandler = "nocolon"\n',
            "invalid setting types.mail.handler: expected 'module:attr', got 'nocolon'",
        ),
        (
            "[default.types.default]\nconcurrency = 4\n",
            "invalid setting types.default.concurrency: limits are per event type:"
            ' set it under [types."<event type>"]',
        ),
        (
            "[default.types.mail]\npriority = 5000\n",
            "invalid setting types.mail.priority: must be between -1000 and 1000",
        ),
        (
            "[default.types]\nmail = 3\n",
            "invalid setting types.mail: expected a table of policy keys",
        ),
    ],
)
def test_bad_type_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value) == message


def test_types_named_nowhere_share_the_default_policy(settings: Settings) -> None:
    policies = Policies(settings)
    assert policies["never.configured"] is policies.default  # no cache entry per type
    assert policies["never.configured"].handler == resolve(settings, "never.configured").handler
    assert policies["order.placed"].concurrency == 2
