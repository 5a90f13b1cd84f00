"""Built-in event handlers: ``simulate``, ``log`` and ``webhook``.

Name them in settings (``[handlers]``, by event type or ``default``) as
``eventsched.plugins.handlers:<name>``. The contract (:mod:`eventsched.core.plugins`): an
asyncio coroutine function taking one :class:`HandlerEvent`; returning means success,
raising means failure (retried with backoff), :class:`PermanentError` means "do not retry"
(the event goes dead at once). ``simulate`` and ``webhook`` need settings, so they are
:func:`handler_factory` functions that the executor calls once with a
:class:`HandlerContext`.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Final

import httpx

from eventsched import __version__
from eventsched.core.errors import EventschedError
from eventsched.core.events import format_time
from eventsched.core.logging import get_logger
from eventsched.core.plugins import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
)

_log = get_logger(__name__)

#: Payload field that may name the webhook URL of one event.
PAYLOAD_URL_FIELD: Final = "webhook_url"
#: Statuses worth retrying: the receiver may succeed later.
RETRY_STATUSES: Final = frozenset({408, 425, 429})


class SimulatedFailure(EventschedError):
    """The ``simulate`` handler's random failure (retried like any other)."""


class WebhookError(EventschedError):
    """The webhook receiver failed in a way that may pass (5xx, 408, 429, network)."""


# -- simulate ----------------------------------------------------------------------------------


@handler_factory
def simulate(context: HandlerContext) -> Handler:
    """The original's behaviour: sleep ``executor.simulate.duration``, then fail with
    probability ``executor.simulate.error_rate`` (so the demo shows retries and dead events)."""
    duration = float(context.settings.executor.simulate.duration)
    error_rate = context.settings.executor.simulate.error_rate
    rng = random.Random()

    async def simulate_event(event: HandlerEvent) -> None:
        if duration > 0:
            await asyncio.sleep(duration)
        if error_rate > 0 and rng.random() < error_rate:
            raise SimulatedFailure(f"simulated failure (error_rate={error_rate:g})")

    return simulate_event


# -- log ---------------------------------------------------------------------------------------


async def log(event: HandlerEvent) -> None:
    """Log the event and succeed."""
    _log.info(
        "event_executed",
        event_id=event.id,
        type=event.type,
        attempt=event.attempt,
        execute_at=format_time(event.execute_at),
        payload=event.payload,
    )


# -- webhook -----------------------------------------------------------------------------------


@handler_factory
def webhook(context: HandlerContext) -> Handler:
    """POST the event as JSON to a URL; see :class:`Webhook`."""
    return Webhook(context)


class Webhook:
    """HTTP POST of the event as JSON, with ``Idempotency-Key: <event id>``.

    URL: the payload's ``webhook_url`` (if ``executor.webhook.allow_payload_url``), else
    ``[webhooks]`` for the event type, else ``[webhooks] default``; none is a
    :class:`PermanentError`. Outcome by response: 2xx succeeds; 408, 425, 429 and 5xx,
    timeouts and connection errors are retried (:class:`WebhookError`); any other status
    (other 4xx, a redirect, which a POST should not get) is a :class:`PermanentError`.

    Body: ``{"id", "type", "payload", "execute_at", "attempt"}``. Uses the executor's shared
    ``httpx.AsyncClient`` (connection pooling across jobs), on the asyncio side where
    handlers run; the time limit is ``executor.webhook.timeout`` for the whole request.
    """

    def __init__(self, context: HandlerContext) -> None:
        settings = context.settings
        self._urls = dict(settings.webhooks)
        self._allow_payload_url = settings.executor.webhook.allow_payload_url
        self._timeout = float(settings.executor.webhook.timeout)
        self._client = context.http_client
        self._user_agent = f"eventsched/{__version__}"

    def url_for(self, event: HandlerEvent) -> str:
        if self._allow_payload_url and PAYLOAD_URL_FIELD in event.payload:
            url = event.payload[PAYLOAD_URL_FIELD]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise PermanentError(f"payload {PAYLOAD_URL_FIELD} is not an http(s) URL: {url!r}")
            return url
        url = self._urls.get(event.type) or self._urls.get("default")
        if url is None:
            raise PermanentError(f"no webhook URL for event type {event.type!r}")
        return url

    @staticmethod
    def body(event: HandlerEvent) -> bytes:
        document: dict[str, Any] = {
            "id": event.id,
            "type": event.type,
            "payload": event.payload,
            "execute_at": format_time(event.execute_at),
            "attempt": event.attempt,
        }
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()

    async def __call__(self, event: HandlerEvent) -> None:
        url = self.url_for(event)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": event.id,
            "User-Agent": self._user_agent,
        }
        try:
            # httpx's timeout is per phase (connect, each read...); wrap the whole request.
            async with asyncio.timeout(self._timeout):
                response = await self._client().post(
                    url, content=self.body(event), headers=headers, timeout=self._timeout
                )
        except TimeoutError:
            raise WebhookError(f"POST {url}: no response within {self._timeout:g}s") from None
        except httpx.TimeoutException as err:
            raise WebhookError(f"POST {url}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            raise WebhookError(f"POST {url}: {type(err).__name__}: {err}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = f"POST {url}: HTTP {status} {response.reason_phrase}".rstrip()
        if status >= 500 or status in RETRY_STATUSES:
            raise WebhookError(detail)
        raise PermanentError(detail)
