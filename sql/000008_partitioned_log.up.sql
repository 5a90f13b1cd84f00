-- eventsched schema, version 8: a time-partitioned event log (docs/retention.md).
--
-- `events` and `event_attempts` become range-partitioned by `retain_from` (the consumer's
-- insert time; a new column, starting equal to `recorded_at`) in one partition per UTC
-- day, named <table>_pYYYYMMDD, plus a default partition. A partitioned table cannot have
-- a unique key without the partition key, so the two uniquenesses that make the log
-- effectively-once (one event per idempotency key, one key per id) move to `event_keys`,
-- which is not partitioned and also says in which partition an event's row is.
--
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. This file does not
-- spell out the columns or the non-unique indexes of 000001-000007 (or of later additions
-- to those tables): it copies them from the old tables (LIKE, pg_get_indexdef). Cost: a
-- full copy of both tables and of their indexes under an ACCESS EXCLUSIVE lock (measured
-- in bench/RESULTS.md, "Partitioned log: migration 000008"); the roles wait and retry.
-- Indexes and keys are built after the rows are copied (a bulk build is faster than
-- maintaining them row by row).

-- Index builds below sort a million rows or more; the default 64MB spills to disk.
SET LOCAL maintenance_work_mem = '256MB';

-- 1. The old tables and everything named after them step aside.
ALTER TABLE event_commands DROP CONSTRAINT event_commands_event_id_fkey;
ALTER TABLE event_attempts DROP CONSTRAINT event_attempts_event_id_fkey;
ALTER TABLE events RENAME TO events_v7;
ALTER TABLE event_attempts RENAME TO event_attempts_v7;
ALTER SEQUENCE event_attempts_id_seq RENAME TO event_attempts_v7_id_seq;

CREATE TEMPORARY TABLE v7_indexes ON COMMIT DROP AS
SELECT c.relname AS tbl, i.relname AS name, pg_get_indexdef(x.indexrelid) AS def
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class c ON c.oid = x.indrelid
WHERE x.indrelid IN ('events_v7'::regclass, 'event_attempts_v7'::regclass)
  AND NOT x.indisunique;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT i.relname AS name
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid IN ('events_v7'::regclass, 'event_attempts_v7'::regclass)
    LOOP
        -- Renaming a constraint's index renames the constraint too.
        EXECUTE format('ALTER INDEX %I RENAME TO %I', r.name, left(r.name, 59) || '_v7');
    END LOOP;
END
$$;

-- 2. The partitioned tables: the same columns, defaults, CHECK constraints and comments.
CREATE TABLE events (
    LIKE events_v7 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS
        INCLUDING STORAGE,
    retain_from timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (retain_from);

COMMENT ON TABLE events IS
    'One row per deferred event; the source of truth for its state (Redis only holds the SAQ jobs). Partitioned by retain_from, one partition per UTC day (docs/retention.md).';
COMMENT ON COLUMN events.retain_from IS
    'The partition key: when the consumer stored the event (= recorded_at), or when retention moved the still-needed row into a newer partition. Also in event_keys.retain_from.';

-- PostgreSQL 15 has no identity column on a partitioned table: a sequence default instead.
CREATE SEQUENCE event_attempts_id_seq AS bigint;
SELECT setval('event_attempts_id_seq', coalesce((SELECT max(id) FROM event_attempts_v7), 0) + 1,
              false);

CREATE TABLE event_attempts (
    LIKE event_attempts_v7 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS
        INCLUDING STORAGE,
    event_retain_from timestamptz NOT NULL
) PARTITION BY RANGE (event_retain_from);
ALTER TABLE event_attempts ALTER COLUMN id SET DEFAULT nextval('event_attempts_id_seq');
ALTER SEQUENCE event_attempts_id_seq OWNED BY event_attempts.id;

COMMENT ON TABLE event_attempts IS
    'One row per execution attempt of an event, for lateness and failure analysis with plain SQL. Partitioned by event_retain_from, with the partitions of events.';
COMMENT ON COLUMN event_attempts.event_retain_from IS
    'The partition key: events.retain_from of the attempt''s event, so the attempts of an event are in the partition of the same day and are retired with it.';

CREATE TABLE event_keys (
    idempotency_key text        NOT NULL,
    id              uuid        NOT NULL,
    retain_from     timestamptz NOT NULL
);

COMMENT ON TABLE event_keys IS
    'One row per kept event: its idempotency key (unique), its id (unique) and the partition of its row (events.retain_from). Not partitioned: the global uniqueness a partitioned table cannot have. Deleted with the event by retention.';

-- 3. Day partitions from the oldest recorded event to a week ahead, and a default one.
DO $$
DECLARE
    first_day date := least(
        coalesce((SELECT min(recorded_at AT TIME ZONE 'UTC') FROM events_v7)::date,
                 (now() AT TIME ZONE 'UTC')::date),
        (now() AT TIME ZONE 'UTC')::date);
    last_day date := (now() AT TIME ZONE 'UTC')::date + 7;
    d date;
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['events', 'event_attempts'] LOOP
        d := first_day;
        WHILE d <= last_day LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                t || '_p' || to_char(d, 'YYYYMMDD'), t,
                d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
            d := d + 1;
        END LOOP;
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', t || '_default', t);
    END LOOP;
END
$$;

-- 4. The rows. Every event keeps its row; retain_from = recorded_at puts an old event in
-- its own day, so the first retention pass retires it the normal way.
INSERT INTO events SELECT o.*, o.recorded_at FROM events_v7 o;
INSERT INTO event_keys (idempotency_key, id, retain_from)
SELECT idempotency_key, id, recorded_at FROM events_v7;
-- Every attempt has its event (the foreign key of 000001 held until now).
INSERT INTO event_attempts SELECT a.*, e.recorded_at
FROM event_attempts_v7 a JOIN events_v7 e ON e.id = a.event_id;

-- 5. Keys and indexes, built once over the copied rows.
ALTER TABLE event_keys
    ADD CONSTRAINT event_keys_pkey PRIMARY KEY (idempotency_key),
    -- An id already used under another key is refused (the consumer's db_rejected).
    ADD CONSTRAINT event_keys_id_key UNIQUE (id);
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id, retain_from);
ALTER TABLE event_attempts
    ADD CONSTRAINT event_attempts_pkey PRIMARY KEY (id, event_retain_from),
    -- Proof that no attempt ran twice: an event has one retain_from at a time, and a move
    -- by retention takes its attempts along in the same transaction.
    ADD CONSTRAINT event_attempts_event_id_attempt_key
        UNIQUE (event_id, attempt, event_retain_from);

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, name, def FROM v7_indexes LOOP
        EXECUTE regexp_replace(
            r.def,
            '^CREATE INDEX \S+ ON (ONLY )?(\S+\.)?' || r.tbl || ' ',
            'CREATE INDEX ' || quote_ident(r.name) || ' ON \2'
                || CASE r.tbl WHEN 'events_v7' THEN 'events' ELSE 'event_attempts' END || ' ');
    END LOOP;
END
$$;

-- `event_commands` stays unpartitioned and loses its foreign key (a foreign key to a
-- partitioned table makes every DETACH scan the referencing table under its lock);
-- retention deletes the commands of the events it drops. Commands that reached no event
-- are deleted `retention.keep` after they were applied:
CREATE INDEX event_commands_unknown_applied_at_idx
    ON event_commands (applied_at) WHERE event_id IS NULL;

DROP TABLE event_attempts_v7;
DROP TABLE events_v7;

-- Statistics for the partitions that hold rows, and for the key table. Not for the empty
-- ones (today's and those ahead): a partition analysed while empty is "known empty"
-- (reltuples 0), and the executor's prepared statements then keep a generic plan that
-- scans it whole while it fills, until autovacuum analyses it. Never analysed, it is
-- planned like a new table, by its indexes (tests/integration/test_partitioned_log.py).
DO $$
DECLARE
    r record;
    has_rows boolean;
BEGIN
    FOR r IN
        SELECT relid::text AS name FROM pg_partition_tree('events') WHERE isleaf
        UNION ALL
        SELECT relid::text FROM pg_partition_tree('event_attempts') WHERE isleaf
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', r.name) INTO has_rows;
        IF has_rows THEN
            EXECUTE format('ANALYZE %s', r.name);
        END IF;
    END LOOP;
END
$$;
ANALYZE event_keys;
