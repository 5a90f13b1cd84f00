-- eventsched schema, version 2: the executor's dead-letter outbox.
--
-- An event that goes `dead` must reach the `events-dlq` topic at least once. The
-- executor publishes it right after the dead transition is committed; if the
-- process dies in between, the reconciler (one leader) finds the event here and
-- publishes it again. Same rules as 000001: one implicit transaction, no
-- CONCURRENTLY. Adding nullable columns without a default only touches the catalog.

ALTER TABLE events
    ADD COLUMN dead_reason      text,
    ADD COLUMN dlq_published_at timestamptz;

COMMENT ON COLUMN events.dead_reason IS
    'Why the event went dead (the dlq-reason header): retries_exhausted, permanent_error or no_handler.';
COMMENT ON COLUMN events.dlq_published_at IS
    'When the dead event was acknowledged by the DLQ topic; NULL while it still has to be published.';

-- Reconciler: `status = 'dead' AND dlq_published_at IS NULL AND finished_at < now() - grace`
-- (dead events whose DLQ message was lost with a crash). Holds only those, so it
-- stays empty in normal operation however many dead events accumulate.
CREATE INDEX events_dead_unpublished_idx
    ON events (finished_at) WHERE status = 'dead' AND dlq_published_at IS NULL;
