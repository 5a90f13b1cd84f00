-- eventsched schema, version 9: an attempt's claim and its handler's start are two moments.
--
-- The executor claims an attempt in PostgreSQL shortly before its due time (within the
-- claim-ahead window) and invokes the handler at the due time. `claimed_at` is when the
-- claim was made (the worker's clock, as the claim sent it); `started_at` and `lateness_ms`
-- become the handler's invocation, written by the statement that records the outcome. Until
-- the outcome is recorded (and for an attempt whose outcome never was: a crash, a lost
-- lease taken over by the reconciler) they hold the claim's values. Rows written before
-- this migration have no `claimed_at`: their `started_at` is the claim time.
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. A nullable column
-- without a default only touches the catalog.

ALTER TABLE event_attempts ADD COLUMN claimed_at timestamptz;

COMMENT ON COLUMN event_attempts.claimed_at IS
    'When the executor claimed the attempt (its clock); NULL for rows written before schema version 9.';
COMMENT ON COLUMN event_attempts.started_at IS
    'When the handler was invoked (written with the outcome); the claim time until then, and for rows written before schema version 9.';
COMMENT ON COLUMN event_attempts.lateness_ms IS
    'started_at - scheduled_for in milliseconds: how late the handler started; negative if a worker clock runs ahead.';
