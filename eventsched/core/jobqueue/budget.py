"""Memory of in-flight payloads: a byte budget for a worker's jobs, and giving freed heap back.

An executor job carries only its event id; the event's payload arrives with its PostgreSQL
claim, for every job of a claim batch at once, and stays until the job ends. Slots alone
therefore do not bound memory: 256 slots and a burst of 1 MB payloads load 256 MB (twice,
while a batch is converted: libpq's result and the Python objects).

:class:`PayloadBudget` is the byte bound. The worker's dispatcher hands a job to a slot only
while the budget has room (:meth:`PayloadBudget.fits`, always at least one job when nothing
is held, so a payload bigger than the whole budget still runs). A job holds its size hint
(:attr:`~eventsched.core.jobqueue.jobs.ScheduledJob.size`: the size its enqueuer saw), or
``unknown`` bytes without one (the largest payload that may arrive:
``consumer.max_message_bytes``), from hand-out until its claim answers, then its payload's
JSON size until it ends. Without hints a 64 MB budget admits 64 jobs whose claim is in
flight, which bounded a burst's drain by the claims' round trips; with them, as many small
payloads as fit. Everything runs on the asyncio
side (dispatcher, slots and job functions share the loop): no locks.

:func:`trim_heap` gives freed memory back to the operating system. CPython hands big objects
(a payload's strings) to the C allocator, and glibc keeps freed blocks in its arenas (one per
thread that allocated: the claim thread's result buffers live in its own), so without it the
resident size stays at its peak after a burst. The budget calls it once payloads of at least
``trim_after`` bytes were released since the last call, ``trim_delay`` after the payload
bytes it holds fell to a quarter of their high-water mark, if they are still that low then;
payloads still held at a trim (the end of a burst) are trimmed again once released, if they
were ``trim_tail`` bytes or more.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Callable

import msgspec

from eventsched.core.runtime.logs import get_logger

log = get_logger(__name__)

_encode = msgspec.json.Encoder().encode


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim(0)``: every arena,
    free pages in the middle included); False where the C library has no such call."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def payload_bytes(payload: object) -> int:
    """Size of a payload as JSON (what the budget counts); the parsed Python objects take
    about as much for long strings and several times as much for many small values."""
    return len(_encode(payload))


class PayloadBudget:
    """Bytes of payload the jobs handed out by one worker may hold at once (asyncio side).

    Invariant: :attr:`held` is the reservation (size hint, else ``unknown``) of every
    handed-out job whose claim has not answered plus the payload size of every claimed job
    that has not ended. The dispatcher hands a job out only if it :meth:`fits`, so
    :attr:`held` exceeds ``limit`` only by payloads bigger than their reservation, or by the
    one job always allowed when nothing is held.
    """

    def __init__(
        self,
        limit: int,
        *,
        unknown: int,
        trim_after: int = 8 * 1024 * 1024,
        trim_delay: float = 1.0,
        trim_tail: int = 1024 * 1024,
    ) -> None:
        self.limit = limit
        self.unknown = max(1, unknown)
        self._unclaimed: dict[str, int] = {}  # handed out, claim pending: its reservation
        self._reserved = 0  # sum of self._unclaimed
        self._claimed: dict[str, int] = {}
        self._payloads = 0  # sum of self._claimed (what is really allocated)
        self._high = 0  # its high-water mark since the last trim
        self._freed = 0  # payload bytes released since the last trim
        self._trim_due = trim_after  # ... that make the next trim worth it
        self._trim_tail = trim_tail
        self._trim_after = trim_after
        self._trim_delay = trim_delay
        self._trim_timer: asyncio.TimerHandle | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def held(self) -> int:
        return self._reserved + self._payloads

    def room(self, each: int | None = None) -> int:
        """How many more jobs of ``each`` bytes (None: ``unknown``) fit now."""
        per = max(1, self.unknown if each is None else each)
        if not self._unclaimed and not self._claimed:
            return max(1, self.limit // per)
        return max(0, self.limit - self.held) // per

    def fits(self, size: int | None) -> bool:
        """Whether a job with this size hint (None: ``unknown``) may be handed out now: it
        fits in what is left, or nothing is held."""
        if not self._unclaimed and not self._claimed:
            return True
        return self.held + (self.unknown if size is None else size) <= self.limit

    def on_release(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever bytes are released (the dispatcher wakes up)."""
        self._listeners.append(listener)

    def reserve(self, job_id: str, size: int | None = None) -> None:
        """A job was handed out: it holds ``size`` bytes (its hint; None: ``unknown``) until
        :meth:`settle`."""
        if job_id not in self._claimed and job_id not in self._unclaimed:
            reservation = self.unknown if size is None else size
            self._unclaimed[job_id] = reservation
            self._reserved += reservation

    def settle(self, job_id: str, size: int) -> None:
        """The job's claim answered: it holds ``size`` bytes (0: no payload) until it ends."""
        reservation = self._unclaimed.pop(job_id, None)
        if reservation is None:
            return  # not handed out through this budget, or settled already
        self._reserved -= reservation
        self._claimed[job_id] = size
        self._payloads += size
        self._high = max(self._high, self._payloads)
        if size < reservation:
            self._released()

    def release(self, job_id: str) -> None:
        """The job ended (or went back to the queue): its bytes are free."""
        if job_id in self._unclaimed:
            self._reserved -= self._unclaimed.pop(job_id)
        elif job_id in self._claimed:
            size = self._claimed.pop(job_id)
            self._payloads -= size
            self._freed += size
        else:
            return
        self._released()

    def _released(self) -> None:
        if (
            self._trim_timer is None
            and self._freed >= self._trim_due
            and self._payloads <= self._high // 4
        ):
            # Not at once: in a burst the next jobs refill the budget within milliseconds,
            # and trimming between them would only hand pages back to fault them in again.
            loop = asyncio.get_running_loop()
            self._trim_timer = loop.call_later(self._trim_delay, self._trim)
        for listener in self._listeners:
            listener()

    def _trim(self) -> None:
        self._trim_timer = None
        if self._payloads > self._high // 4:
            return  # busy again; the next release looks again
        started = time.perf_counter()
        if trim_heap():
            log.info(
                "heap_trimmed",
                payload_high_water=self._high,
                payloads_freed=self._freed,
                took_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        self._high = self._payloads
        self._freed = 0
        tail = self._payloads
        self._trim_due = (
            min(self._trim_after, tail) if tail >= self._trim_tail else self._trim_after
        )
