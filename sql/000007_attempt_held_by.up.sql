-- eventsched schema, version 7: why an attempt waited for its start.
--
-- An event type with a concurrency or rate limit across all executors (settings
-- [types."<event type>"], docs/execution.md "Per-type limits") may hold a due attempt back
-- until a lease or token frees. `held_by` names the limit that held it; NULL means the
-- attempt was free to run as soon as it was due, so its lateness_ms is the scheduler's own.
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. A nullable column
-- without a default only touches the catalog.

ALTER TABLE event_attempts
    ADD COLUMN held_by text CHECK (held_by IN ('concurrency', 'rate'));

COMMENT ON COLUMN event_attempts.held_by IS
    'concurrency or rate: the type''s limit held this attempt back after its due time (its lateness_ms is then mostly that wait); NULL: free to run when due.';
