-- Reverts 000002_dead_letter_outbox.up.sql (the index goes with its column).
DROP INDEX IF EXISTS events_dead_unpublished_idx;
ALTER TABLE events
    DROP COLUMN IF EXISTS dlq_published_at,
    DROP COLUMN IF EXISTS dead_reason;
