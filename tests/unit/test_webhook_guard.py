"""Payload-chosen webhook URLs: refused targets, no port-scan signal, no secrets in errors.

Every connection these tests make goes to loopback: the receivers listen on 127.0.0.1, and
the refused targets are loopback spellings (the guard refuses them before connecting, which
the receivers' request/connection counts show). Called directly (on the asyncio side, as the
executor runs handlers); tests/integration/test_webhook_guard.py goes through a running
executor.
"""

from __future__ import annotations

import pytest

from eventsched.core.runtime.contracts import PermanentError
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import build_settings
from eventsched.plugins.handlers import WebhookError
from tests.support.webhook import (
    QSECRET,
    SECRET,
    SECRETS,
    TOKEN,
    NotHttp,
    Receiver,
    call_webhook,
    event,
    failure,
    payload_settings,
    settings_with,
    without_port,
)

# -- settings ----------------------------------------------------------------------------------


def test_payload_urls_are_off_by_default_and_need_an_allow_list() -> None:
    assert build_settings({}).executor.webhook.allow_payload_url is False
    with pytest.raises(ConfigError) as info:
        build_settings({"executor": {"webhook": {"allow_payload_url": True}}})
    assert info.value.key == "executor.webhook.allowed_hosts"
    with pytest.raises(ConfigError) as info:
        build_settings(
            {"executor": {"webhook": {"allow_payload_url": True, "allowed_hosts": ["a b"]}}}
        )
    assert info.value.key == "executor.webhook.allowed_hosts"
    with pytest.raises(ConfigError) as info:
        build_settings({"executor": {"webhook": {"secret_path_patterns": ["("]}}})
    assert info.value.key == "executor.webhook.secret_path_patterns"


# -- refused before connecting -------------------------------------------------------------------


async def test_a_payload_url_is_ignored_unless_allowed(receiver: Receiver) -> None:
    settings = settings_with(webhooks={"default": f"{receiver.base}/204"})
    await call_webhook(settings, event(webhook_url=f"{receiver.base}/500"))
    assert [path for path, _, _ in receiver.requests] == ["/204"]


@pytest.mark.parametrize(
    ("allowed", "host"),
    [
        (["hooks.example.com"], "127.0.0.1"),  # not listed
        (["*"], "127.0.0.1"),  # listed by the wildcard, but loopback
        (["*"], "2130706433"),
        (["*"], "0x7f.1"),
        (["*"], "127.1"),
        (["*"], "[::ffff:127.0.0.1]"),
        (["localhost"], "localhost"),  # a listed name does not make loopback addresses ok
        (["*", "10.0.0.0/8"], "localhost"),
    ],
)
async def test_loopback_is_refused_before_any_connection(
    receiver: Receiver, allowed: list[str], host: str
) -> None:
    port = receiver.server_address[1]
    err = await failure(payload_settings(*allowed), f"http://{host}:{port}/204")
    assert isinstance(err, PermanentError)
    assert "not allowed" in str(err) or "non-public" in str(err)
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("allowed", "host"),
    [(["127.0.0.1"], "127.0.0.1"), (["localhost", "127.0.0.0/8"], "localhost")],
)
async def test_loopback_is_reached_when_listed(
    receiver: Receiver, allowed: list[str], host: str
) -> None:
    port = receiver.server_address[1]
    await call_webhook(payload_settings(*allowed), event(webhook_url=f"http://{host}:{port}/204"))
    ((path, headers, _),) = receiver.requests
    assert path == "/204"
    assert headers["Host"] == f"{host}:{port}"


async def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    err = await failure(payload_settings("127.0.0.1"), f"{receiver.base}/302")
    assert isinstance(err, PermanentError)
    assert str(err).endswith("HTTP 302 Found")
    assert [path for path, _, _ in receiver.requests] == ["/302"]


# -- no port-scan signal ---------------------------------------------------------------------------


async def test_a_refused_host_gives_the_same_error_for_closed_and_open_ports(
    not_http: NotHttp, closed_port: int
) -> None:
    settings = payload_settings("*")
    closed = await failure(settings, f"http://0x7f.1:{closed_port}/x")
    open_ = await failure(settings, f"http://0x7f.1:{not_http.port}/x")
    assert type(closed) is type(open_) is PermanentError
    assert without_port(str(closed), closed_port) == without_port(str(open_), not_http.port)
    assert not_http.accepted == 0


async def test_an_allowed_host_gives_the_same_error_for_closed_and_non_http_ports(
    not_http: NotHttp, closed_port: int, receiver: Receiver
) -> None:
    # The timeout is what the slow receiver (2 s) costs; the closed port and the non-HTTP one
    # answer on loopback within milliseconds.
    settings = payload_settings("127.0.0.1", timeout="150ms")
    closed = await failure(settings, f"http://127.0.0.1:{closed_port}/x")
    open_ = await failure(settings, f"http://127.0.0.1:{not_http.port}/x")
    slow = await failure(settings, f"{receiver.base}/slow")
    assert not_http.accepted == 1
    assert type(closed) is type(open_) is type(slow) is WebhookError
    assert without_port(str(closed), closed_port) == without_port(str(open_), not_http.port)
    assert without_port(str(open_), not_http.port) == without_port(
        str(slow), receiver.server_address[1]
    ).replace("/slow", "/x")


# -- secrets ---------------------------------------------------------------------------------------


async def test_a_configured_url_with_credentials_and_tokens_fails_without_them(
    receiver: Receiver, closed_port: int
) -> None:
    port = receiver.server_address[1]
    for url in (
        f"http://user:{SECRET}@127.0.0.1:{port}/503/services/{TOKEN}?token={QSECRET}",
        f"http://user:{SECRET}@127.0.0.1:{closed_port}/services/{TOKEN}?token={QSECRET}",
    ):
        settings = settings_with(webhooks={"default": url})
        with pytest.raises(WebhookError) as info:
            await call_webhook(settings, event())
        text = str(info.value)
        assert "user:***@127.0.0.1" in text and "token=***" in text
        assert not any(s in text for s in SECRETS), text
    assert receiver.requests[0][1]["Authorization"].startswith("Basic ")


async def test_configured_secret_path_patterns_are_hidden(receiver: Receiver) -> None:
    settings = settings_with(
        webhooks={"default": f"{receiver.base}/503/hook/k-{SECRET}"},
        executor={"webhook": {"secret_path_patterns": ["k-.*"]}},
    )
    with pytest.raises(WebhookError) as info:
        await call_webhook(settings, event())
    assert str(info.value) == f"POST {receiver.base}/503/hook/***: HTTP 503 Service Unavailable"
