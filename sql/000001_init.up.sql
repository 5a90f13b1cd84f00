-- eventsched schema, version 1: the event log and the attempt log.
--
-- Applied by `eventsched migrate up` (eventsched/core/store/migrations.py) or by the
-- golang-migrate `migrate/migrate` image; both send this whole file as ONE
-- simple-protocol query, which PostgreSQL runs as one implicit transaction, so a
-- failure leaves nothing half-created. Keep it that way: no explicit BEGIN/COMMIT
-- and no CREATE INDEX CONCURRENTLY in this file.
--
-- Index budget: the consumer inserts up to ~20k events/s, and every index is one
-- more B-tree insertion per event (and per status change, since status changes
-- are never HOT updates: status appears in the partial index predicates). Each
-- index below names the query that needs it; do not add one without a query.

CREATE TABLE events (
    id               uuid        NOT NULL,
    idempotency_key  text        NOT NULL,
    type             text        NOT NULL,
    payload          jsonb       NOT NULL,
    execute_at       timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'scheduled',
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text,
    next_attempt_at  timestamptz,
    late             boolean     NOT NULL DEFAULT false,
    kafka_topic      text,
    kafka_partition  integer,
    kafka_offset     bigint,
    created_at       timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,

    CONSTRAINT events_pkey PRIMARY KEY (id),
    -- Absorbs Kafka redelivery: the consumer inserts with ON CONFLICT DO NOTHING.
    CONSTRAINT events_idempotency_key_key UNIQUE (idempotency_key),
    CONSTRAINT events_status_check
        CHECK (status IN ('scheduled', 'running', 'retrying', 'succeeded', 'dead')),
    CONSTRAINT events_attempts_check CHECK (attempts >= 0),
    -- The reconciler finds stuck retries by next_attempt_at; a retrying event
    -- without one would never be picked up again.
    CONSTRAINT events_retrying_has_next_attempt_check
        CHECK (status <> 'retrying' OR next_attempt_at IS NOT NULL)
);

COMMENT ON TABLE events IS
    'One row per deferred event; the source of truth for its state (Redis only holds the SAQ jobs).';
COMMENT ON COLUMN events.id IS 'Event id from the producer; also the SAQ job key.';
COMMENT ON COLUMN events.idempotency_key IS
    'Producer-chosen key (also the Kafka message key); a redelivered or resent event with the same key is ignored.';
COMMENT ON COLUMN events.type IS 'Selects the handler plugin that executes the event.';
COMMENT ON COLUMN events.payload IS 'Event data handed to the handler; opaque to eventsched.';
COMMENT ON COLUMN events.execute_at IS 'Due time (UTC): the event must not run before it.';
COMMENT ON COLUMN events.status IS
    'scheduled -> running -> succeeded; running -> retrying -> running; running -> dead. Changed only by compare-and-set UPDATEs.';
COMMENT ON COLUMN events.attempts IS 'Number of attempts started so far (= max(event_attempts.attempt)).';
COMMENT ON COLUMN events.last_error IS 'Error of the most recent failed attempt.';
COMMENT ON COLUMN events.next_attempt_at IS 'When a retrying event runs next (set with status = retrying).';
COMMENT ON COLUMN events.late IS 'The due time had already passed when the consumer recorded the event.';
COMMENT ON COLUMN events.kafka_topic IS 'Kafka topic the event was consumed from (NULL if not from Kafka).';
COMMENT ON COLUMN events.kafka_partition IS 'Kafka partition the event was consumed from.';
COMMENT ON COLUMN events.kafka_offset IS 'Kafka offset of the message within its partition.';
COMMENT ON COLUMN events.created_at IS 'When the producer created the event (from the message, not our clock).';
COMMENT ON COLUMN events.recorded_at IS 'When the consumer stored the event.';
COMMENT ON COLUMN events.updated_at IS
    'Last status change; every transition must set it (the reconciler detects stale running events with it).';
COMMENT ON COLUMN events.finished_at IS 'When the event reached succeeded or dead.';

-- Reconciler: `status = 'scheduled' AND execute_at < now() - grace` (overdue events
-- whose SAQ job may be missing). Also serves `eventsched status`: the oldest
-- overdue event is the first entry, and count(*) WHERE status = 'scheduled' is an
-- index-only scan. Partial, so it shrinks as events leave 'scheduled'.
CREATE INDEX events_scheduled_execute_at_idx
    ON events (execute_at) WHERE status = 'scheduled';

-- Reconciler: `status = 'retrying' AND next_attempt_at < now() - grace`; also
-- counts retrying events for `eventsched status`. Holds only retrying events.
CREATE INDEX events_retrying_next_attempt_at_idx
    ON events (next_attempt_at) WHERE status = 'retrying';

-- Reconciler: `status = 'running' AND updated_at < now() - stale_after` (a worker
-- died mid-attempt); also counts running events. Holds only running events.
CREATE INDEX events_running_updated_at_idx
    ON events (updated_at) WHERE status = 'running';

-- `eventsched status` counts dead events and operators list the latest ones
-- (ORDER BY finished_at DESC). Dead events are rare, so this index is tiny and
-- costs nothing on the insert path. There is deliberately no index for
-- 'succeeded' (nearly every row): count it as total minus the other statuses,
-- taking the total from count(*) on small tables or from pg_class.reltuples /
-- pg_stat_user_tables.n_live_tup on big ones.
CREATE INDEX events_dead_finished_at_idx
    ON events (finished_at) WHERE status = 'dead';

CREATE TABLE event_attempts (
    id             bigint           GENERATED ALWAYS AS IDENTITY,
    event_id       uuid             NOT NULL,
    attempt        integer          NOT NULL,
    scheduled_for  timestamptz      NOT NULL,
    started_at     timestamptz      NOT NULL,
    finished_at    timestamptz,
    lateness_ms    double precision NOT NULL,
    outcome        text,
    error          text,
    worker_id      text             NOT NULL,

    CONSTRAINT event_attempts_pkey PRIMARY KEY (id),
    CONSTRAINT event_attempts_event_id_fkey
        FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE,
    -- Proof that no attempt ran twice: a second executor starting the same attempt
    -- of the same event fails here. Its index (leading column event_id) also serves
    -- the foreign key (ON DELETE CASCADE) and "all attempts of an event".
    CONSTRAINT event_attempts_event_id_attempt_key UNIQUE (event_id, attempt),
    CONSTRAINT event_attempts_attempt_check CHECK (attempt >= 1),
    CONSTRAINT event_attempts_outcome_check
        CHECK (outcome IN ('succeeded', 'retried', 'dead'))
);

COMMENT ON TABLE event_attempts IS
    'One row per execution attempt of an event, for lateness and failure analysis with plain SQL.';
COMMENT ON COLUMN event_attempts.attempt IS 'Attempt number, starting at 1 (events.attempts after it started).';
COMMENT ON COLUMN event_attempts.scheduled_for IS
    'When this attempt was due: events.execute_at for the first, next_attempt_at for retries.';
COMMENT ON COLUMN event_attempts.lateness_ms IS
    'started_at - scheduled_for in milliseconds; negative if a worker clock runs ahead.';
COMMENT ON COLUMN event_attempts.outcome IS
    'succeeded, retried (another attempt follows) or dead (gave up); NULL while the attempt runs.';
COMMENT ON COLUMN event_attempts.error IS 'Error message of a failed attempt.';
COMMENT ON COLUMN event_attempts.worker_id IS 'Executor instance that ran the attempt.';

-- Analysis: attempts in a time range (lateness percentiles, failure rates per
-- minute). Rows are appended in started_at order, so a BRIN index answers range
-- scans for a few pages of index and almost no insert cost, unlike a B-tree.
-- It cannot serve ORDER BY started_at LIMIT n; add a B-tree if a query needs that.
CREATE INDEX event_attempts_started_at_brin
    ON event_attempts USING brin (started_at);
