"""How the consumer waits out a dependency that fails: :class:`DependencyRetry` calls a
function until it stops raising ``DependencyError`` (PostgreSQL, Redis, the broker), with
exponential backoff and jitter, for as long as it takes; meanwhile consumption is paused
and ``/readyz`` names the dependency. Nothing is committed or skipped while it waits.

Runs on the trio side (the role's tasks); the pause and resume go to the consumer adapter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity
import trio

from eventsched.core.kafka import KafkaConsumer
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.sections import ConsumerSettings

if TYPE_CHECKING:
    from eventsched.core.runtime.health import Health

T = TypeVar("T")


class DependencyRetry:
    """``await retrying(fn, *args)``: ``fn(*args)`` once it stops raising DependencyError."""

    def __init__(self, settings: ConsumerSettings, health: Health, log: Any) -> None:
        self._settings = settings
        self._health = health
        self._log = log
        #: The consumer to pause while a dependency fails (None until it is open).
        self.consumer: KafkaConsumer | None = None
        # Dependencies whose failure paused consumption: name -> problem.
        self._failing: dict[str, str] = {}

    async def __call__(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` until it stops raising DependencyError (backoff with jitter); pause
        consumption and mark the dependency down meanwhile, undo both on success."""
        s = self._settings
        retrying = tenacity.AsyncRetrying(
            sleep=trio.sleep,
            retry=tenacity.retry_if_exception_type(DependencyError),
            # Full exponential backoff plus up to one initial step of jitter, so that several
            # consumers do not hammer a recovering server in lockstep.
            wait=tenacity.wait_exponential(multiplier=s.backoff_initial, max=s.backoff_max)
            + tenacity.wait_random(0, s.backoff_initial),
            before_sleep=self._on_dependency_failure,
            reraise=True,
        )
        result: T = await retrying(fn, *args, **kwargs)
        if self._failing:
            await self._on_recovery()
        return result

    async def _on_dependency_failure(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        err = outcome.exception() if outcome is not None else None
        if not isinstance(err, DependencyError):
            return
        first = not self._failing
        if self._failing.get(err.dependency) != err.problem:
            self._health.mark(err.dependency, err.problem)
        self._failing[err.dependency] = err.problem
        self._log.warning(
            "dependency_retry",
            dependency=err.dependency,
            error=err.problem,
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 3),
        )
        if first and self.consumer is not None:
            try:
                await self.consumer.pause()
            except DependencyError as pause_err:
                self._log.warning("pause_failed", error=str(pause_err))

    async def _on_recovery(self) -> None:
        for dependency in list(self._failing):
            self._health.mark(dependency, None)
        self._failing.clear()
        self._log.info("dependencies_recovered")
        if self.consumer is not None:
            try:
                await self.consumer.resume()
            except DependencyError as err:
                self._log.warning("resume_failed", error=str(err))
