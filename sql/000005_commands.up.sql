-- eventsched schema, version 5: commands on events (cancel, reschedule, retry).
--
-- Commands travel on the `events` topic next to the schedule messages (wire format
-- version 2, see docs/wire-format.md); the consumer applies each with one compare-and-set
-- statement (eventsched/core/store/commands.py) and records it here. Same rules as
-- 000001: one implicit transaction, no CONCURRENTLY.
--
-- Cost on an existing table: replacing the status CHECK constraint reads every row of
-- `events` once (to validate it) while the ALTER holds its ACCESS EXCLUSIVE lock; the new
-- nullable column and the new table only touch the catalog.

ALTER TABLE events DROP CONSTRAINT events_status_check;
ALTER TABLE events
    ADD CONSTRAINT events_status_check
        CHECK (status IN ('scheduled', 'running', 'retrying', 'succeeded', 'dead', 'cancelled')),
    ADD COLUMN cancel_requested_at timestamptz;

ALTER TABLE event_attempts DROP CONSTRAINT event_attempts_outcome_check;
ALTER TABLE event_attempts
    ADD CONSTRAINT event_attempts_outcome_check
        CHECK (outcome IN ('succeeded', 'retried', 'dead', 'cancelled'));

COMMENT ON COLUMN events.status IS
    'scheduled -> running -> succeeded; running -> retrying -> running; running -> dead; dead -> scheduled (dlq replay, retry command); scheduled|retrying -> cancelled (cancel command); running -> cancelled (a failed attempt after a cancel request); cancelled -> scheduled (retry command). Changed only by compare-and-set UPDATEs.';
COMMENT ON COLUMN events.finished_at IS 'When the event reached succeeded, dead or cancelled.';
COMMENT ON COLUMN events.cancel_requested_at IS
    'When a cancel command reached the event (while it was running, or when it cancelled it); a running attempt that fails then ends the event cancelled, with no retry. Cleared by a retry command.';
COMMENT ON COLUMN event_attempts.outcome IS
    'succeeded, retried (another attempt follows), dead (gave up) or cancelled (failed after a cancel request: no retry); NULL while the attempt runs.';

-- `eventsched status` and the gauges count cancelled events (succeeded is the total minus
-- the others, so every other status needs a cheap count). Cancelled events are few.
CREATE INDEX events_cancelled_finished_at_idx
    ON events (finished_at) WHERE status = 'cancelled';

CREATE TABLE event_commands (
    command_id       uuid        NOT NULL,
    op               text        NOT NULL,
    event_id         uuid,
    idempotency_key  text,
    execute_at       timestamptz,
    requested_by     text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL,
    result           text        NOT NULL,
    status_before    text,
    detail           text        NOT NULL DEFAULT '',
    applied_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    kafka_topic      text,
    kafka_partition  integer,
    kafka_offset     bigint,

    CONSTRAINT event_commands_pkey PRIMARY KEY (command_id),
    -- A command's history goes with its event, like the attempts.
    CONSTRAINT event_commands_event_id_fkey
        FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE,
    CONSTRAINT event_commands_op_check CHECK (op IN ('cancel', 'reschedule', 'retry')),
    CONSTRAINT event_commands_result_check
        CHECK (result IN ('applied', 'cancel_requested', 'not_applicable', 'refused',
                          'unknown_event'))
);

COMMENT ON TABLE event_commands IS
    'One row per command applied to the event log (cancel, reschedule, retry), in the order the consumer applied them; a repeated command (same command_id) is not applied again.';
COMMENT ON COLUMN event_commands.command_id IS 'Chosen by the sender (tombstones: derived from their Kafka position); repeats apply once.';
COMMENT ON COLUMN event_commands.op IS 'cancel, reschedule or retry.';
COMMENT ON COLUMN event_commands.event_id IS 'The event the command reached (NULL: no such event when it was applied).';
COMMENT ON COLUMN event_commands.idempotency_key IS 'The target as the command named it, by key (NULL if it named an event id).';
COMMENT ON COLUMN event_commands.execute_at IS 'The due time the command asked for (reschedule; retry, NULL = at once).';
COMMENT ON COLUMN event_commands.requested_by IS 'Who sent the command (free text from the sender; kafka-tombstone for tombstones).';
COMMENT ON COLUMN event_commands.created_at IS 'When the sender created the command (from the message).';
COMMENT ON COLUMN event_commands.result IS
    'applied, cancel_requested (cancel of a running event: no retry follows), not_applicable (cancel of a finished event), refused (the event is in a status the op does not apply to) or unknown_event.';
COMMENT ON COLUMN event_commands.status_before IS 'The event''s status when the command was applied (NULL for unknown_event).';
COMMENT ON COLUMN event_commands.detail IS 'Why a command did not apply, in words.';
COMMENT ON COLUMN event_commands.applied_at IS 'When the consumer applied the command (clock_timestamp(), inside its transaction).';
COMMENT ON COLUMN event_commands.kafka_topic IS 'Kafka topic the command was consumed from.';
COMMENT ON COLUMN event_commands.kafka_partition IS 'Kafka partition the command was consumed from.';
COMMENT ON COLUMN event_commands.kafka_offset IS 'Kafka offset of the command within its partition.';

-- The history of one event (`WHERE event_id = $1 ORDER BY applied_at`); also serves the
-- foreign key's ON DELETE CASCADE.
CREATE INDEX event_commands_event_id_idx ON event_commands (event_id, applied_at);
