-- Reverts 000010_event_traceparent.up.sql: events no longer remember their trace.
ALTER TABLE events DROP COLUMN IF EXISTS traceparent;
