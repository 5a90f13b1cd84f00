-- eventsched schema, version 4: a fresh attempt budget for a dead event run again.
--
-- `eventsched dlq replay` sets a dead event back to `scheduled`; its attempts keep
-- counting (4, 5, ... after three), and `executor.max_retries` applies to the attempts
-- made since the replay: the executor compares `attempts - attempt_base` with it.
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. A constant default
-- on a new column only touches the catalog (no table rewrite); no index: no query
-- filters on it.

ALTER TABLE events
    ADD COLUMN attempt_base integer NOT NULL DEFAULT 0;

COMMENT ON COLUMN events.attempt_base IS
    'events.attempts when the current attempt budget began: 0, or the attempts made before the last dlq replay re-ran the event.';
COMMENT ON COLUMN events.status IS
    'scheduled -> running -> succeeded; running -> retrying -> running; running -> dead; dead -> scheduled (dlq replay). Changed only by compare-and-set UPDATEs.';
