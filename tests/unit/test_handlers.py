"""Specification of the built-in handlers (simulate, log, webhook) and of handler loading.

The webhook handler is called directly (on the asyncio side, where the executor runs
handlers) against a real HTTP server on a thread; tests/integration/test_handlers.py runs it
through an executor.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import structlog
import trio

from eventsched.core.runtime.contracts import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
    load_handler,
)
from eventsched.core.runtime.errors import PluginError
from eventsched.plugins.handlers import SimulatedFailure, Webhook, WebhookError
from tests.support.proc import free_port
from tests.support.webhook import (
    BUILTIN,
    Receiver,
    call_webhook,
    context,
    event,
    on_asyncio,
    settings_with,
)

# -- loading ------------------------------------------------------------------------------------


@handler_factory
def greeting_factory(context: HandlerContext) -> Handler:
    prefix = context.settings.env

    async def greet(event: HandlerEvent) -> None:
        raise PermanentError(f"{prefix}:{event.id}")

    return greet


@handler_factory
def broken_factory(context: HandlerContext) -> Handler:
    raise ValueError("no such thing")


@handler_factory
def sync_factory(context: HandlerContext) -> Any:
    return lambda event: None


def test_a_handler_factory_is_called_with_the_context() -> None:
    handler = load_handler(
        "handlers.x", "tests.unit.test_handlers:greeting_factory", context(settings_with())
    )
    with pytest.raises(PermanentError, match="test:01890a5d"):
        trio.run(on_asyncio, handler, event())


@pytest.mark.parametrize(
    ("target", "ctx", "problem"),
    [
        ("tests.unit.test_handlers:greeting_factory", False, "is a handler factory; it needs a HandlerContext"),
        ("tests.unit.test_handlers:broken_factory", True, "handler factory failed: ValueError('no such thing')"),
        ("tests.unit.test_handlers:sync_factory", True, "must be an async function taking one HandlerEvent"),
    ],
)  # fmt: skip
def test_bad_handler_factories(target: str, ctx: bool, problem: str) -> None:
    with pytest.raises(PluginError) as info:
        load_handler("handlers.x", target, context(settings_with()) if ctx else None)
    assert info.value.problem == problem


def test_every_builtin_loads_from_settings_names() -> None:
    for name in ("simulate", "log", "webhook"):
        assert callable(
            load_handler("handlers.default", f"{BUILTIN}:{name}", context(settings_with()))
        )


# -- simulate and log ------------------------------------------------------------------------------


async def test_simulate_sleeps_then_fails_at_its_error_rate() -> None:
    always = load_handler(
        "handlers.default",
        f"{BUILTIN}:simulate",
        context(settings_with(executor={"simulate": {"duration": "20ms", "error_rate": 1.0}})),
    )
    never = load_handler(
        "handlers.default",
        f"{BUILTIN}:simulate",
        context(settings_with(executor={"simulate": {"duration": "20ms", "error_rate": 0.0}})),
    )
    started = time.perf_counter()
    await on_asyncio(never, event())
    assert time.perf_counter() - started >= 0.02
    with pytest.raises(SimulatedFailure, match=r"simulated failure \(error_rate=1\)"):
        await on_asyncio(always, event())


async def test_log_logs_the_event() -> None:
    handler = load_handler("handlers.default", f"{BUILTIN}:log")
    with structlog.testing.capture_logs() as logs:
        await on_asyncio(handler, event(attempt=2, order=7))
    assert logs == [
        {
            "event": "event_executed",
            "event_id": "01890a5d-ac96-774b-bcce-b302099a8057",
            "type": "order.placed",
            "attempt": 2,
            "execute_at": "2024-05-01T10:00:00.000Z",
            "payload": {"order": 7},
            "log_level": "info",
            "logger_name": "eventsched.plugins.handlers",
        }
    ]


# -- webhook -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("webhooks", "allow", "payload", "expected"),
    [
        ({"order.placed": "http://a/x", "default": "http://d/"}, True, {}, "http://a/x"),
        ({"default": "http://d/"}, True, {}, "http://d/"),
        ({"default": "http://d/"}, True, {"webhook_url": "https://p/y"}, "https://p/y"),
        ({"default": "http://d/"}, False, {"webhook_url": "https://p/y"}, "http://d/"),
        ({"default": "http://d/"}, None, {"webhook_url": "https://p/y"}, "http://d/"),
    ],
)
def test_webhook_url_comes_from_the_payload_or_the_settings(
    webhooks: dict[str, str], allow: bool | None, payload: dict[str, Any], expected: str
) -> None:
    # None: the default, which is "no" (a payload must not choose targets unless allowed).
    hook = {} if allow is None else {"allow_payload_url": allow, "allowed_hosts": ["p"]}
    settings = settings_with(webhooks=webhooks, executor={"webhook": hook})
    assert Webhook(context(settings)).url_for(event(**payload)) == expected


@pytest.mark.parametrize(
    ("webhooks", "payload", "problem"),
    [
        ({}, {}, "no webhook URL for event type 'order.placed'"),
        ({"other": "http://o/"}, {}, "no webhook URL for event type 'order.placed'"),
        ({}, {"webhook_url": "ftp://x"}, "payload webhook_url is not an http(s) URL: 'ftp://x'"),
        ({}, {"webhook_url": 5}, "payload webhook_url is not an http(s) URL: 5"),
    ],
)
def test_webhook_without_a_usable_url_is_permanent(
    webhooks: dict[str, str], payload: dict[str, Any], problem: str
) -> None:
    hook = {"allow_payload_url": True, "allowed_hosts": ["*"]}
    settings = settings_with(webhooks=webhooks, executor={"webhook": hook})
    with pytest.raises(PermanentError) as info:
        Webhook(context(settings)).url_for(event(**payload))
    assert str(info.value) == problem


async def test_webhook_posts_the_event_with_an_idempotency_key(receiver: Receiver) -> None:
    settings = settings_with(webhooks={"order.placed": f"{receiver.base}/204"})
    await call_webhook(settings, event(attempt=2, order=7))
    ((path, headers, body),) = receiver.requests
    assert path == "/204"
    assert headers["Idempotency-Key"] == "01890a5d-ac96-774b-bcce-b302099a8057"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("eventsched/")
    assert body == {
        "id": "01890a5d-ac96-774b-bcce-b302099a8057",
        "type": "order.placed",
        "payload": {"order": 7},
        "execute_at": "2024-05-01T10:00:00.000Z",
        "attempt": 2,
    }


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("503", WebhookError, "HTTP 503 Service Unavailable"),
        ("429", WebhookError, "HTTP 429 Too Many Requests"),
        ("408", WebhookError, "HTTP 408 Request Timeout"),
        ("400", PermanentError, "HTTP 400 Bad Request"),
        ("404", PermanentError, "HTTP 404 Not Found"),
        ("301", PermanentError, "HTTP 301 Moved Permanently"),
    ],
)
async def test_webhook_status_decides_retry_or_dead(
    receiver: Receiver, path: str, error: type[Exception], message: str
) -> None:
    settings = settings_with(webhooks={"default": f"{receiver.base}/{path}"})
    with pytest.raises(error, match=message):
        await call_webhook(settings, event())


async def test_webhook_timeouts_and_refused_connections_are_retried(receiver: Receiver) -> None:
    # /slow answers after 2 s: any timeout well under that proves the timeout is retried.
    slow = settings_with(
        webhooks={"default": f"{receiver.base}/slow"}, executor={"webhook": {"timeout": "100ms"}}
    )
    with pytest.raises(WebhookError, match=r"POST .*/slow: "):
        await call_webhook(slow, event())
    port = free_port()  # nobody listening
    refused = settings_with(webhooks={"default": f"http://127.0.0.1:{port}/"})
    with pytest.raises(WebhookError, match="ConnectError"):
        await call_webhook(refused, event())
