"""The consumer role: Kafka ``events`` -> PostgreSQL (source of truth) -> SAQ jobs in Redis.

Per Kafka batch, in three steps; up to ``PARALLEL_BATCHES`` batches are in the first two at
once (batch N+1 is decoded and scheduled while batch N is inserted), the inserts run one
batch at a time in fetch order, and commits follow fetch order:

1. *record*: decode every message (:func:`decode_message`: an event or a command); invalid
   ones go to the DLQ topic with their original bytes, key and headers plus the reason
   headers; valid events are inserted into PostgreSQL with ONE statement (``ON CONFLICT
   (idempotency_key) DO NOTHING``), then the keys that already existed are looked up.
2. *schedule*: one pipelined enqueue of a SAQ job (the executor's contract,
   :func:`eventsched.core.domain.jobcontract.make_job`: key = event id, scheduled = due time) for
   every event of the batch whose row is still ``scheduled`` - new rows and rows a crashed
   run inserted but never enqueued (enqueueing a pending key again is a no-op).
3. *commit*: the batch's offsets; batches that became durable while a commit was in flight
   are merged into the next commit.

Commands (cancel, reschedule, retry; a tombstone with a key is a cancel) are applied in step
1, in log order, right after the batch's INSERT and before the next batch's; in step 2,
after the batch's own jobs, the changed events' jobs are removed or moved in Redis
(:mod:`~eventsched.plugins.consumer.commands`).

So an offset is committed only once everything before it is durable in PostgreSQL and
Redis (and DLQ deliveries are acknowledged, or the refused copies kept in PostgreSQL); a
crash anywhere means redelivery, which the idempotency key and the job key make harmless.

Failures:

* A dependency down (``DependencyError``: PostgreSQL, Redis, broker) is retried with
  exponential backoff and jitter for as long as it takes; meanwhile fetching is paused,
  ``/readyz`` names the dependency and nothing is committed or skipped. It never sends a
  message to the DLQ (:mod:`~eventsched.plugins.consumer.dependencies`).
* PostgreSQL refusing the data of the batch (``RowsRejected``) is narrowed down by splitting
  the batch in halves; a single row still refused after ``consumer.max_retries`` attempts
  goes to the DLQ with reason ``db_rejected`` (:mod:`~eventsched.plugins.consumer.record`).
* Dead-letter copies are cut to the budget of :func:`~eventsched.core.domain.deadletter.fit_dead_letter`
  (the key, the original headers, the value, each only as far as needed; ``dlq-truncated-*``
  headers say what was cut). A copy the topic refuses for what it is (still too large,
  invalid record) is kept in PostgreSQL (``dlq_undeliverable``) and the batch moves on; any
  other delivery failure is a dependency failure (retried, never skipped) and marks the role
  stalled (``dlq_failing``) until the copies are acknowledged
  (:mod:`~eventsched.plugins.consumer.deadletters`).
* The same idempotency key with other content (another id, type, payload or due time):
  the first event wins; the later message counts as ``duplicate`` and is logged as
  ``conflicting_duplicate`` with both ids.

Rebalances: the revoke hook waits (``consumer.revoke_wait``) for the batches in flight and
commits what is durable; the adapter refuses commits for partitions that moved meanwhile.
A consumer left without partitions for ``consumer.unassigned_grace`` while records wait
that no member commits reports itself stalled (``/readyz`` 503; see
:meth:`~eventsched.plugins.consumer.partitions.PartitionWatch.watch_assignment`).

Modules: :mod:`~eventsched.plugins.consumer.role` (:class:`IngestConsumer`, the pipeline,
stages 2 and 3, rebalances), :mod:`~eventsched.plugins.consumer.record` (stage 1),
:mod:`~eventsched.plugins.consumer.commands` (commands on events),
:mod:`~eventsched.plugins.consumer.deadletters` (the copies of bad messages),
:mod:`~eventsched.plugins.consumer.dependencies` (waiting out a failing dependency),
:mod:`~eventsched.plugins.consumer.partitions` (the lag gauge, the no-partitions stall).
All run on the trio side.

Imports: ``eventsched.core`` (domain, jobqueue, kafka, runtime, store) only; never another
role plugin, and never Kafka, Redis, SAQ or PostgreSQL client libraries directly.
"""

from eventsched.plugins.consumer.role import IngestConsumer

__all__ = ["IngestConsumer"]
