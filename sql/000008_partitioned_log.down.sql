-- Undo version 8: `events` and `event_attempts` unpartitioned again, the unique key on
-- `events.idempotency_key`, the identity column and the foreign keys back. Every kept row
-- is kept (rows already dropped by retention stay dropped). Same rules as 000001.

DO $$
BEGIN
    -- Impossible while event_keys holds one row per event; refuse with words, not with a
    -- unique violation halfway through.
    IF EXISTS (SELECT 1 FROM events GROUP BY idempotency_key HAVING count(*) > 1) THEN
        RAISE EXCEPTION 'cannot undo 000008: two kept events share an idempotency key';
    END IF;
    IF EXISTS (SELECT 1 FROM events GROUP BY id HAVING count(*) > 1) THEN
        RAISE EXCEPTION 'cannot undo 000008: an event id is kept twice';
    END IF;
END
$$;

SET LOCAL maintenance_work_mem = '256MB';

ALTER TABLE events RENAME TO events_v8;
ALTER TABLE event_attempts RENAME TO event_attempts_v8;
ALTER SEQUENCE event_attempts_id_seq RENAME TO event_attempts_v8_id_seq;

-- The parents' non-unique indexes (a partition's index is attached to its parent's).
CREATE TEMPORARY TABLE v8_indexes ON COMMIT DROP AS
SELECT c.relname AS tbl, i.relname AS name, pg_get_indexdef(x.indexrelid) AS def
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class c ON c.oid = x.indrelid
WHERE x.indrelid IN ('events_v8'::regclass, 'event_attempts_v8'::regclass)
  AND NOT x.indisunique;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT i.relname AS name
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid IN ('events_v8'::regclass, 'event_attempts_v8'::regclass)
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', r.name, left(r.name, 59) || '_v8');
    END LOOP;
END
$$;

CREATE TABLE events (
    LIKE events_v8 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS
        INCLUDING STORAGE
);
ALTER TABLE events DROP COLUMN retain_from;
COMMENT ON TABLE events IS
    'One row per deferred event; the source of truth for its state (Redis only holds the SAQ jobs).';

CREATE TABLE event_attempts (
    LIKE event_attempts_v8 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS
        INCLUDING STORAGE
);
ALTER TABLE event_attempts ALTER COLUMN id DROP DEFAULT;
COMMENT ON TABLE event_attempts IS
    'One row per execution attempt of an event, for lateness and failure analysis with plain SQL.';
ALTER TABLE event_attempts DROP COLUMN event_retain_from;

DO $$
DECLARE
    cols text;
    acols text;
    next_id bigint;
BEGIN
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
    FROM pg_attribute WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format('INSERT INTO events (%s) SELECT %s FROM events_v8', cols, cols);
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO acols
    FROM pg_attribute
    WHERE attrelid = 'event_attempts'::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format('INSERT INTO event_attempts (%s) SELECT %s FROM event_attempts_v8',
                   acols, acols);
    next_id := greatest(coalesce((SELECT max(id) FROM event_attempts), 0),
                        (SELECT last_value FROM event_attempts_v8_id_seq)) + 1;
    EXECUTE format(
        'ALTER TABLE event_attempts ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (START WITH %s)',
        next_id);
END
$$;

ALTER TABLE events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id),
    ADD CONSTRAINT events_idempotency_key_key UNIQUE (idempotency_key);
ALTER TABLE event_attempts
    ADD CONSTRAINT event_attempts_pkey PRIMARY KEY (id),
    ADD CONSTRAINT event_attempts_event_id_fkey
        FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE,
    ADD CONSTRAINT event_attempts_event_id_attempt_key UNIQUE (event_id, attempt);

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, name, def FROM v8_indexes LOOP
        EXECUTE regexp_replace(
            r.def,
            '^CREATE INDEX \S+ ON (ONLY )?(\S+\.)?' || r.tbl || ' ',
            'CREATE INDEX ' || quote_ident(r.name) || ' ON \2'
                || CASE r.tbl WHEN 'events_v8' THEN 'events' ELSE 'event_attempts' END || ' ');
    END LOOP;
END
$$;

DROP INDEX event_commands_unknown_applied_at_idx;
-- Commands of events retention dropped have no event any more: they go, as ON DELETE
-- CASCADE would have taken them.
DELETE FROM event_commands c
WHERE c.event_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM events e WHERE e.id = c.event_id);
ALTER TABLE event_commands
    ADD CONSTRAINT event_commands_event_id_fkey
        FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE;

DROP TABLE event_attempts_v8;
DROP TABLE events_v8;
DROP TABLE event_keys;
