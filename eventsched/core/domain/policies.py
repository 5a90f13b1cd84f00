"""Per-type policies: what an event type's attempts use, resolved from settings (pure).

A key a type does not set is inherited; for type ``t``, the first that sets it wins:

1. ``[types."t"]``;
2. ``[handlers] "t"`` (the handler only: ``[handlers]`` is shorthand for ``handler``);
3. ``[types.default]``;
4. ``[handlers] default`` (the handler), ``[executor]`` (``max_retries``,
   ``retry_backoff``, ``job_timeout`` as ``timeout``); no limits; priority 0.

``retry_backoff`` is inherited key by key (a type may set only ``base``). Limits
(``concurrency``, ``rate``/``burst``) are set on named types only: each is that type's
budget across all executor processes, enforced in Redis (:mod:`eventsched.core.jobqueue.limits`).
A type gets its own lane in the queue (:class:`~eventsched.core.jobqueue.limits.Lane`) when it
has a limit or a priority other than the default's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, TypeVar

from eventsched.core.jobqueue.limits import Lane
from eventsched.core.runtime.sections import RetryBackoffSettings
from eventsched.core.runtime.settings import Settings
from eventsched.core.runtime.typesettings import (
    DEFAULT_TYPE,
    BackoffOverride,
    TypeSettings,
    type_key,
)

#: Seconds a concurrency lease outlives the type's timeout: room for the claim before the
#: handler and the outcome after it. A lease of a process that died returns after
#: ``timeout + LEASE_MARGIN`` at the latest.
LEASE_MARGIN: Final = 5.0

_NONE = TypeSettings()

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TypePolicy:
    """What the attempts of one event type use (see the module docstring)."""

    type: str
    handler: str | None  # "module:attr"; None: no handler (the attempt goes dead)
    handler_key: str  # the settings key it came from, for errors
    max_retries: int
    retry_backoff: RetryBackoffSettings
    timeout: float
    concurrency: int  # 0: no limit
    rate: float  # starts per second; 0: no limit
    burst: int
    priority: int

    @property
    def limited(self) -> bool:
        return self.concurrency > 0 or self.rate > 0


def _first(*values: T | None) -> T | None:
    for value in values:
        if value is not None:
            return value
    return None


def _pick(fallback: T, *values: T | None) -> T:
    """The first value that is set, else ``fallback``."""
    found = _first(*values)
    return fallback if found is None else found


def _backoff(
    executor: RetryBackoffSettings, *overrides: BackoffOverride | None
) -> RetryBackoffSettings:
    layers = [o for o in overrides if o is not None]
    if not layers:
        return executor
    return RetryBackoffSettings(
        base=_pick(executor.base, *(o.base for o in layers)),
        factor=_pick(executor.factor, *(o.factor for o in layers)),
        max=_pick(executor.max, *(o.max for o in layers)),
        jitter=_pick(executor.jitter, *(o.jitter for o in layers)),
    )


def resolve(settings: Settings, type_: str) -> TypePolicy:
    """The policy of ``type_`` (any type, configured or not)."""
    own = settings.types.get(type_, _NONE) if type_ != DEFAULT_TYPE else _NONE
    default = settings.types.get(DEFAULT_TYPE, _NONE)
    ex = settings.executor
    handler: str | None
    if own.handler is not None:
        handler, key = own.handler, type_key(type_, "handler")
    elif type_ in settings.handlers and type_ != DEFAULT_TYPE:
        handler, key = settings.handlers[type_], f"handlers.{type_}"
    elif default.handler is not None:
        handler, key = default.handler, "types.default.handler"
    else:
        handler, key = settings.handlers.get(DEFAULT_TYPE), "handlers.default"
    rate = own.rate or 0.0
    return TypePolicy(
        type=type_,
        handler=handler,
        handler_key=key,
        max_retries=_pick(ex.max_retries, own.max_retries, default.max_retries),
        retry_backoff=_backoff(ex.retry_backoff, own.retry_backoff, default.retry_backoff),
        timeout=float(_pick(ex.job_timeout, own.timeout, default.timeout)),
        concurrency=own.concurrency or 0,
        rate=rate,
        burst=own.burst or (max(1, math.floor(rate)) if rate else 0),
        priority=_pick(0, own.priority, default.priority),
    )


class Policies:
    """Every type's policy, resolved once per type; the queue lanes of the named types."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: dict[str, TypePolicy] = {}
        self.default = resolve(settings, DEFAULT_TYPE)
        named = [resolve(settings, t) for t in settings.types if t != DEFAULT_TYPE]
        self.lanes: tuple[Lane, ...] = tuple(
            Lane(
                name=p.type,
                priority=p.priority,
                concurrency=p.concurrency,
                rate=p.rate,
                burst=p.burst,
                lease=p.timeout + LEASE_MARGIN,
            )
            for p in named
            if p.limited or p.priority != self.default.priority
        )
        self._laned = frozenset(lane.name for lane in self.lanes)

    def __getitem__(self, type_: str) -> TypePolicy:
        policy = self._cache.get(type_)
        if policy is None:
            if type_ not in self._settings.types and type_ not in self._settings.handlers:
                # Named nowhere: the default's policy (not cached per type: event types
                # come from whoever produces events, without bound).
                return self.default
            policy = self._cache[type_] = resolve(self._settings, type_)
        return policy

    def lane_of(self, type_: str | None) -> str:
        """The queue lane a job of ``type_`` waits in ("" for the shared one)."""
        return type_ if type_ is not None and type_ in self._laned else ""

    def timeouts(self) -> list[float]:
        """The handler timeout of every configured type, and the default's."""
        return [self.default.timeout, *(self[t].timeout for t in self._settings.types)]
