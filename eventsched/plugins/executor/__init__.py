"""The executor role: runs each scheduled event at its due time, once in effect.

The consumer enqueues one SAQ job per event; an :class:`~eventsched.core.jobqueue.OnTimeWorker`
(on the root trio-asyncio loop, ``executor.concurrency`` slots) hands it to a slot up to
``CLAIM_AHEAD`` (40 ms) before its due time and calls
:meth:`Attempts.execute_event <eventsched.plugins.executor.attempt.Attempts.execute_event>`
at once (``function_waits``), which:

1. **claims** the event: CAS ``scheduled|retrying -> running`` plus its ``event_attempts``
   row (``claimed_at``), committed before the handler runs (a job whose claim loses — a
   duplicate delivery, a reconciler race, an event already done — runs nothing:
   ``skipped_duplicate``; a job that came before the event is due — beyond ``CLAIM_AHEAD`` —
   runs nothing either and is put back into the queue at the attempt's due time:
   ``eventsched_claims_not_due_total``); then waits on its own clock until the due time
   (:func:`~eventsched.core.jobqueue.wait_until`, never early), so the claim's round trip
   happens before the due time instead of after it;
2. runs the **handler** for the event type (``[handlers]``, else ``default``) under
   ``executor.job_timeout`` and the attempt's lease; the moment it is invoked is the
   attempt's start (``eventsched_execution_lateness_seconds``, ``started_at``,
   ``lateness_ms``);
3. **records** the outcome (CAS ``running -> succeeded|retrying|dead`` with ``AND attempts =
   n``, plus the attempt row: outcome, and the handler's start and lateness), written
   behind: the job returns at once and the outcome commits with the next batch (see
   ``Attempts._record`` for why that is safe);
4. once the outcome committed: on ``retrying`` enqueues the next attempt; on ``dead`` hands
   the event to the DLQ publisher.

The job contract (key scheme, kwargs, timeout, the first attempt, due times) is
:mod:`eventsched.core.domain.jobcontract`. A dead event re-run by ``dlq replay``
(``scheduled`` again) gets the first attempt's job: SAQ takes a finished key again.

Where handlers run: on the asyncio side, inside SAQ's job task, awaited directly. Per-job
CPU is the budget here (the queue adapter alone takes ~0.3-0.6 ms per job); hopping to the
trio side for every handler would add two cross-loop hand-offs per job. asyncio handlers
can use httpx/aiohttp/asyncpg directly; a trio handler is wrapped with
``trio_asyncio.trio_as_aio``.

Memory: a job carries only the event id; the payload comes with the claim. The worker hands
jobs to slots only while their payloads fit in ``executor.inflight_bytes``
(:class:`~eventsched.core.jobqueue.PayloadBudget`; a job counts as
``consumer.max_message_bytes`` until its claim tells its payload's size).

PostgreSQL writes are batched across concurrent jobs (:class:`GroupCommit
<eventsched.core.store.groupcommit.GroupCommit>`: one statement per round trip on a dedicated
thread, no timers).

Shutdown: on ``ctx.stopping`` the worker takes no new jobs and running ones finish (bounded
by the runtime's grace). Jobs still running when the grace ends are cancelled; each records
its attempt as interrupted (``retrying`` at once, or ``dead`` if it was the last) on its way
out — if even that fails, the reconciler's stale-running path recovers the event.

Modules:

* :mod:`~eventsched.plugins.executor.role` — :class:`Executor`, the role plugin: builds the
  parts and runs them (trio side);
* :mod:`~eventsched.plugins.executor.attempt` — the job function: claim, handler, outcome,
  retry (asyncio side);
* :mod:`~eventsched.plugins.executor.retry` — the retry policy: backoff and the outcome of
  an attempt (statuses and attempt budgets);
* :mod:`~eventsched.plugins.executor.lease` — leases and fencing: what a handler can rely on;
* :mod:`~eventsched.plugins.executor.deadletters` — dead events -> the DLQ topic;
* :mod:`~eventsched.plugins.executor.reconciler` — the leader that repairs PostgreSQL/Redis
  drift, takes stale attempts over and republishes dead letters; it lives with the
  executor it serves;
* :mod:`~eventsched.plugins.executor.schedules` — the schedule leader: applies
  ``[schedules.<name>]`` at start and publishes recurring schedules' occurrences as events.

Imports: ``eventsched.core`` (domain, jobqueue, kafka, runtime, store) only; never another
role plugin, and never Kafka, Redis, SAQ or PostgreSQL client libraries directly.
"""

from eventsched.plugins.executor.role import Executor

__all__ = ["Executor"]
