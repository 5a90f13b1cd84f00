"""``client_config`` layers settings in one order for every client kind.

Pure logic: each expected configuration below is the one the call site built inline
before the function existed, so a change of merge order shows here.
"""

from __future__ import annotations

from typing import Any

import pytest

from eventsched.core.kafka import (
    CONSUMER_CLIENT_DEFAULTS,
    CONSUMER_DEFAULTS,
    NO_AUTO_CREATE,
    PRODUCER_DEFAULTS,
    ClientKind,
    client_config,
    config_from_settings,
)
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import Settings, build_settings, load_settings

BOOTSTRAP = "broker-a:9092"


def _settings(client: dict[str, Any], consumer_client: dict[str, Any]) -> Settings:
    return build_settings(
        {
            "kafka": {
                "bootstrap_servers": BOOTSTRAP,
                "client": client,
                "consumer_client": consumer_client,
            }
        },
        "test",
    )


# Every layer sets "linger.ms", "queued.max.messages.kbytes" and "bootstrap.servers", so
# the winner of each key shows which layer comes last.
CLIENT = {
    "security.protocol": "SSL",
    "linger.ms": 1,
    "queued.max.messages.kbytes": 1,
    "bootstrap.servers": "broker-b:9092",
}
CONSUMER_CLIENT = {"queued.max.messages.kbytes": 2, "session.timeout.ms": 6000}


def test_producer_lets_kafka_client_redirect_bootstrap_servers() -> None:
    config = config_from_settings(
        _settings(CLIENT, CONSUMER_CLIENT), ClientKind.PRODUCER, {"message.timeout.ms": 5}
    )
    assert config == {
        **PRODUCER_DEFAULTS,
        **NO_AUTO_CREATE,
        "bootstrap.servers": BOOTSTRAP,
        **CLIENT,
        "message.timeout.ms": 5,
    }
    assert config["bootstrap.servers"] == "broker-b:9092"
    assert "session.timeout.ms" not in config  # consumer settings stay with consumers


def test_group_consumer_layers_defaults_client_consumer_client_then_own_keys() -> None:
    own = {"group.id": "g", "client.id": "c"}
    config = config_from_settings(
        _settings(CLIENT, CONSUMER_CLIENT), ClientKind.GROUP_CONSUMER, own
    )
    assert config == {
        **CONSUMER_DEFAULTS,
        **CONSUMER_CLIENT_DEFAULTS,
        **NO_AUTO_CREATE,
        **CLIENT,
        **CONSUMER_CLIENT,
        "bootstrap.servers": BOOTSTRAP,
        **own,
    }
    assert config["queued.max.messages.kbytes"] == 2
    assert config["bootstrap.servers"] == BOOTSTRAP
    # Without settings of its own, the consumer keeps its prefetch default.
    plain = config_from_settings(_settings({}, {}), ClientKind.GROUP_CONSUMER)
    assert plain["queued.max.messages.kbytes"] == 1024


def test_the_consumer_role_loads_a_small_prefetch_refilled_at_once() -> None:
    """What the shipped settings give the consumer role (docs/design-notes.md, "Consumer
    prefetch"): 1 MB queued ahead, fetches of 256 KB per partition and 1 MB in all, and
    1 ms (not librdkafka's second) before fetching again once the queue was full."""
    settings = load_settings(
        environ={"EVENTSCHED_ENV": "test", "EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS": BOOTSTRAP}
    )
    config = config_from_settings(settings, ClientKind.GROUP_CONSUMER)
    assert {key: config[key] for key in CONSUMER_CLIENT_DEFAULTS} == {
        "queued.max.messages.kbytes": 1024,
        "fetch.queue.backoff.ms": 1,
        "max.partition.fetch.bytes": 262_144,
        "fetch.max.bytes": 1_048_576,
    }
    # Settings still win, key by key.
    overridden = config_from_settings(
        _settings({}, {"queued.max.messages.kbytes": 4096}), ClientKind.GROUP_CONSUMER
    )
    assert overridden["queued.max.messages.kbytes"] == 4096
    assert overridden["fetch.queue.backoff.ms"] == 1


def test_reader_takes_consumer_settings_without_the_role_defaults() -> None:
    own = {"group.id": "replay", "enable.auto.commit": False}
    config = config_from_settings(_settings(CLIENT, CONSUMER_CLIENT), ClientKind.READER, own)
    assert config == {
        **NO_AUTO_CREATE,
        **CLIENT,
        **CONSUMER_CLIENT,
        "bootstrap.servers": BOOTSTRAP,
        **own,
    }


def test_admin_pins_bootstrap_servers_and_ignores_consumer_settings() -> None:
    config = client_config(
        ClientKind.ADMIN,
        BOOTSTRAP,
        client=CLIENT,
        consumer_client=CONSUMER_CLIENT,
        own={"socket.timeout.ms": 2000},
    )
    assert config == {
        **NO_AUTO_CREATE,
        **CLIENT,
        "bootstrap.servers": BOOTSTRAP,
        "socket.timeout.ms": 2000,
    }
    assert client_config(ClientKind.ADMIN, BOOTSTRAP) == {
        **NO_AUTO_CREATE,
        "bootstrap.servers": BOOTSTRAP,
    }


@pytest.mark.parametrize("kind", list(ClientKind))
def test_no_client_creates_a_topic_by_naming_it(kind: ClientKind) -> None:
    assert client_config(kind, BOOTSTRAP)["allow.auto.create.topics"] is False


def test_own_keys_win_over_every_setting() -> None:
    config = client_config(
        ClientKind.PRODUCER, BOOTSTRAP, client=CLIENT, own={"linger.ms": 7, "acks": "1"}
    )
    assert (config["linger.ms"], config["acks"]) == (7, "1")


def test_missing_bootstrap_servers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        config_from_settings(build_settings({}, "test"), ClientKind.ADMIN)
