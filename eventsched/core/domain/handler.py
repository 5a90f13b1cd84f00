"""The handler contract: what user code implements to run events of a type.

An event handler is an async callable ``handler(event: HandlerEvent) -> None`` that returns
on success and raises on failure (:class:`PermanentError` means "do not retry"). Handlers are
*asyncio* coroutines: the executor calls them from its job function, on the asyncio side of
trio-asyncio (a handler written for trio can be wrapped with ``trio_asyncio.trio_as_aio``).
A handler that needs settings or shared clients is built by a factory marked with
:func:`handler_factory`: ``factory(context: HandlerContext) -> Handler``, called once per
settings entry when the executor starts.

Public through :mod:`eventsched`; light on purpose (no server libraries), so user code can
import it anywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from eventsched.core.runtime.errors import EventschedError

if TYPE_CHECKING:
    import httpx

    from eventsched.core.runtime.settings import Settings


@dataclass(frozen=True)
class HandlerEvent:
    """What a handler receives: enough to act, and the id to make side effects idempotent."""

    id: str
    type: str
    payload: Mapping[str, Any]
    execute_at: datetime
    attempt: int
    #: W3C ``traceparent`` of this attempt's span (tracing on), else of the event's trace,
    #: else None: a handler that calls other services passes it on (the webhook does).
    traceparent: str | None = None


Handler = Callable[[HandlerEvent], Awaitable[None]]


@dataclass(frozen=True)
class HandlerContext:
    """What a handler factory receives: the settings and the executor's shared clients."""

    settings: Settings
    key: str  # the settings key being loaded, e.g. "handlers.default"
    # The executor's one shared HTTP client (asyncio side), created on first call and
    # closed by the executor on shutdown.
    http_client: Callable[[], httpx.AsyncClient]


HandlerFactory = Callable[[HandlerContext], Handler]
F = TypeVar("F", bound=Callable[..., Any])
_FACTORY_MARK = "__eventsched_handler_factory__"


def handler_factory(fn: F) -> F:
    """Mark ``fn(context: HandlerContext) -> Handler`` as a handler factory: settings may
    name it like a handler, and :func:`load_handler` calls it to build the handler."""
    setattr(fn, _FACTORY_MARK, True)
    return fn


def is_handler_factory(obj: object) -> bool:
    return bool(getattr(obj, _FACTORY_MARK, False))


class PermanentError(EventschedError):
    """Raised by a handler when retrying cannot help (bad payload): the event goes dead."""
