"""Built-in event handlers: ``simulate``, ``log`` and ``webhook``.

Name them in settings (``[handlers]``, by event type or ``default``) as
``eventsched.plugins.handlers:<name>``. The contract (:mod:`eventsched.core.runtime.contracts`): an
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
import ssl
from base64 import b64encode
from typing import Any, Final

import httpcore
import httpx

from eventsched import __version__
from eventsched.core.domain.event import format_time
from eventsched.core.runtime.contracts import (
    Handler,
    HandlerContext,
    HandlerEvent,
    PermanentError,
    handler_factory,
)
from eventsched.core.runtime.errors import EventschedError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.netguard import (
    HOST_NOT_ALLOWED,
    AddressRefused,
    GuardedBackend,
    UnresolvableHost,
    parse_allowed_hosts,
)
from eventsched.core.runtime.redaction import compile_secret_paths, redact, redact_url

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
    """HTTP POST of the event as JSON, with ``Idempotency-Key: <event id>`` (and the
    attempt's W3C ``traceparent`` when the event belongs to a trace).

    URL: the payload's ``webhook_url`` if ``executor.webhook.allow_payload_url`` (off by
    default), else ``[webhooks]`` for the event type, else ``[webhooks] default``; none is a
    :class:`PermanentError`. Outcome by response: 2xx succeeds; 408, 425, 429 and 5xx,
    timeouts and connection errors are retried (:class:`WebhookError`); any other status
    (other 4xx, a redirect, which is never followed) is a :class:`PermanentError`.

    A payload URL is chosen by whoever produces events, so it goes through
    :mod:`eventsched.core.runtime.netguard`: http/https only, host in
    ``executor.webhook.allowed_hosts``, every resolved address public or in a listed
    network, the connection made to the checked address (TLS still verified against the
    URL's host name); a refusal is a :class:`PermanentError` raised before any connection.
    Its failures read the same whether the port was closed, timed out or spoke something
    other than HTTP, so error texts cannot be used to scan ports. Each such request gets its
    own connection (an httpcore pool opened and closed around it: nothing outlives the
    job; the TLS context is shared).

    Configured URLs are the operator's: they use the executor's shared ``httpx.AsyncClient``
    (connection pooling across jobs) and their errors keep the transport detail.

    Every error text shows the URL through :func:`~eventsched.core.runtime.redaction.redact_url`
    (no password, query values, fragment, or path segments matching
    ``executor.webhook.secret_path_patterns`` or looking like tokens).

    Body: ``{"id", "type", "payload", "execute_at", "attempt"}``. Runs on the asyncio side
    where handlers run; the time limit is ``executor.webhook.timeout`` for the whole request.
    """

    def __init__(self, context: HandlerContext) -> None:
        settings = context.settings
        hook = settings.executor.webhook
        self._urls = dict(settings.webhooks)
        self._allow_payload_url = hook.allow_payload_url
        self._allowed = parse_allowed_hosts(hook.allowed_hosts)
        self._backend = GuardedBackend(self._allowed)
        self._secret_paths = compile_secret_paths(hook.secret_path_patterns)
        self._timeout = float(hook.timeout)
        self._client = context.http_client
        self._ssl: ssl.SSLContext | None = None
        self._user_agent = f"eventsched/{__version__}"

    def url_for(self, event: HandlerEvent) -> str:
        return self.target_for(event)[0]

    def target_for(self, event: HandlerEvent) -> tuple[str, bool]:
        """The URL for ``event`` and whether it came from the payload (and is guarded)."""
        if self._allow_payload_url and PAYLOAD_URL_FIELD in event.payload:
            url = event.payload[PAYLOAD_URL_FIELD]
            shown = repr(self.redact(url)) if isinstance(url, str) else repr(url)[:64]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise PermanentError(f"payload {PAYLOAD_URL_FIELD} is not an http(s) URL: {shown}")
            try:
                host = httpx.URL(url).raw_host.decode("ascii")
            except (httpx.InvalidURL, UnicodeError):
                raise PermanentError(
                    f"payload {PAYLOAD_URL_FIELD} is not a valid URL: {shown}"
                ) from None
            if not host:
                raise PermanentError(f"payload {PAYLOAD_URL_FIELD} has no host: {shown}")
            if not self._allowed.permits_host(host):
                raise PermanentError(f"POST {self.redact(url)}: {HOST_NOT_ALLOWED}")
            return url, True
        url = self._urls.get(event.type) or self._urls.get("default")
        if url is None:
            raise PermanentError(f"no webhook URL for event type {event.type!r}")
        return url, False

    def redact(self, url: str) -> str:
        return redact_url(url, self._secret_paths)

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
        url, guarded = self.target_for(event)
        shown = self.redact(url)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": event.id,
            "User-Agent": self._user_agent,
        }
        if event.traceparent is not None:
            # W3C Trace Context: the receiver's work joins the event's trace.
            headers["traceparent"] = event.traceparent
        if guarded:
            status = await self._post_guarded(url, shown, self.body(event), headers)
            detail = f"POST {shown}: HTTP {status} {httpx.codes.get_reason_phrase(status)}"
        else:
            status, reason = await self._post_configured(url, shown, self.body(event), headers)
            detail = f"POST {shown}: HTTP {status} {reason}"
        if 200 <= status < 300:
            return
        detail = detail.rstrip()
        if status >= 500 or status in RETRY_STATUSES:
            raise WebhookError(detail)
        raise PermanentError(detail)

    async def _post_configured(
        self, url: str, shown: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str]:
        try:
            # httpx's timeout is per phase (connect, each read...); wrap the whole request.
            async with asyncio.timeout(self._timeout):
                response = await self._client().post(
                    url,
                    content=body,
                    headers=headers,
                    timeout=self._timeout,
                    follow_redirects=False,
                )
        except TimeoutError:
            raise WebhookError(f"POST {shown}: no response within {self._timeout:g}s") from None
        except httpx.TimeoutException as err:
            raise WebhookError(f"POST {shown}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            detail = redact(str(err), self._secret_paths)
            raise WebhookError(f"POST {shown}: {type(err).__name__}: {detail}") from None
        return response.status_code, response.reason_phrase

    async def _post_guarded(
        self, url: str, shown: str, body: bytes, headers: dict[str, str]
    ) -> int:
        """POST to a payload URL through the guarded backend; returns the status (the
        response body is not read)."""
        parsed = httpx.URL(url)
        request_headers = [
            (b"Host", parsed.netloc),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ]
        if parsed.userinfo:
            credentials = f"{parsed.username}:{parsed.password}".encode()
            request_headers.append((b"Authorization", b"Basic " + b64encode(credentials)))
        target = httpcore.URL(
            scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
        )
        limit = self._timeout
        try:
            async with (
                asyncio.timeout(limit),
                httpcore.AsyncConnectionPool(
                    ssl_context=self._ssl_context(),
                    max_connections=1,
                    network_backend=self._backend,
                ) as pool,
                pool.stream(
                    "POST",
                    target,
                    headers=request_headers,
                    content=body,
                    extensions={
                        "timeout": {"connect": limit, "read": limit, "write": limit, "pool": limit}
                    },
                ) as response,
            ):
                return response.status
        except AddressRefused as err:
            raise PermanentError(f"POST {shown}: {err}") from None
        except UnresolvableHost as err:
            raise WebhookError(f"POST {shown}: {err}") from None
        except _NO_RESPONSE_ERRORS as err:
            _log.debug("webhook_no_response", url=shown, error=type(err).__name__)
            raise WebhookError(f"POST {shown}: {NO_RESPONSE}") from None

    def _ssl_context(self) -> ssl.SSLContext:
        # Loading the CA bundle takes milliseconds: once per handler, not per request.
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl


#: What a guarded request reports for every failure short of an HTTP response.
NO_RESPONSE: Final = "no HTTP response (connection failed, timed out or not HTTP)"
_NO_RESPONSE_ERRORS: Final = (
    TimeoutError,
    OSError,
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)
