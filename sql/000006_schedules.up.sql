-- eventsched schema, version 6: recurring schedules.
--
-- A schedule is configuration, not an event: its definition is written here directly (by
-- the executor applying [schedules.<name>] from settings at start, by the HTTP API and by
-- `eventsched schedules`), and the schedule leader of the executors turns its occurrences
-- into ordinary events on the `events` topic (eventsched/plugins/executor/schedules.py).
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. A new table only: no
-- cost on existing rows.

CREATE TABLE schedules (
    name                  text        NOT NULL,
    type                  text        NOT NULL,
    cron                  text,
    every_ms              bigint,
    timezone              text        NOT NULL DEFAULT 'UTC',
    payload               jsonb       NOT NULL DEFAULT '{}'::jsonb,
    start_at              timestamptz,
    end_at                timestamptz,
    misfire               text        NOT NULL DEFAULT 'run_once',
    misfire_limit         integer     NOT NULL DEFAULT 100,
    paused                boolean     NOT NULL DEFAULT false,
    source                text        NOT NULL,
    definition_hash       text        NOT NULL DEFAULT '',
    revision              bigint      NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    materialised_through  timestamptz,

    CONSTRAINT schedules_pkey PRIMARY KEY (name),
    CONSTRAINT schedules_cron_xor_every_check CHECK ((cron IS NULL) <> (every_ms IS NULL)),
    CONSTRAINT schedules_every_ms_check CHECK (every_ms IS NULL OR every_ms > 0),
    CONSTRAINT schedules_misfire_check CHECK (misfire IN ('run_once', 'run_all', 'skip')),
    CONSTRAINT schedules_misfire_limit_check CHECK (misfire_limit > 0),
    CONSTRAINT schedules_source_check CHECK (source IN ('settings', 'api')),
    CONSTRAINT schedules_bounds_check CHECK (end_at IS NULL OR start_at IS NULL OR end_at >= start_at)
);

COMMENT ON TABLE schedules IS
    'Recurring schedules; their occurrences become events keyed <name>@<occurrence time UTC>.';
COMMENT ON COLUMN schedules.name IS 'Unique name; the prefix of its occurrences'' idempotency keys.';
COMMENT ON COLUMN schedules.type IS 'Event type of the occurrences (selects the handler).';
COMMENT ON COLUMN schedules.cron IS 'Cron expression (5 fields, or 6 with seconds first); NULL when every_ms is set.';
COMMENT ON COLUMN schedules.every_ms IS 'Fixed interval in milliseconds (elapsed time); NULL when cron is set.';
COMMENT ON COLUMN schedules.timezone IS 'IANA time zone the cron expression is read in.';
COMMENT ON COLUMN schedules.payload IS 'Payload of every occurrence''s event.';
COMMENT ON COLUMN schedules.start_at IS 'First instant an occurrence may have (inclusive; also the anchor of every_ms).';
COMMENT ON COLUMN schedules.end_at IS 'Last instant an occurrence may have (inclusive).';
COMMENT ON COLUMN schedules.misfire IS 'Occurrences never materialised while nothing ran: run_once (the latest), run_all (up to misfire_limit, the newest), skip.';
COMMENT ON COLUMN schedules.misfire_limit IS 'At most this many missed occurrences are caught up by run_all.';
COMMENT ON COLUMN schedules.paused IS 'A paused schedule materialises nothing; resume skips what passed meanwhile.';
COMMENT ON COLUMN schedules.source IS 'settings (applied from [schedules.<name>] at executor start) or api (HTTP API, CLI).';
COMMENT ON COLUMN schedules.definition_hash IS 'settings: hash of the definition last applied from the file (unchanged file: the row is left alone).';
COMMENT ON COLUMN schedules.revision IS 'Incremented by every change; the leader advances the watermark only on the revision it read.';
COMMENT ON COLUMN schedules.materialised_through IS
    'Watermark: every occurrence up to this instant was published to the events topic and acknowledged (NULL: none yet).';
