-- Reverts 000005_commands.up.sql. The command history is lost. The old status CHECK has
-- no `cancelled`: cancelled events become `dead` with dead_reason 'cancelled', marked as
-- published (the DLQ never heard of them), and attempts that ended `cancelled` become
-- `dead`.
DROP TABLE IF EXISTS event_commands;
DROP INDEX IF EXISTS events_cancelled_finished_at_idx;
UPDATE event_attempts SET outcome = 'dead' WHERE outcome = 'cancelled';
UPDATE events
SET status = 'dead', dead_reason = 'cancelled', dlq_published_at = coalesce(finished_at, now())
WHERE status = 'cancelled';
ALTER TABLE event_attempts DROP CONSTRAINT event_attempts_outcome_check;
ALTER TABLE event_attempts
    ADD CONSTRAINT event_attempts_outcome_check
        CHECK (outcome IN ('succeeded', 'retried', 'dead'));
ALTER TABLE events DROP CONSTRAINT events_status_check;
ALTER TABLE events
    DROP COLUMN IF EXISTS cancel_requested_at,
    ADD CONSTRAINT events_status_check
        CHECK (status IN ('scheduled', 'running', 'retrying', 'succeeded', 'dead'));
COMMENT ON COLUMN events.status IS
    'scheduled -> running -> succeeded; running -> retrying -> running; running -> dead; dead -> scheduled (dlq replay). Changed only by compare-and-set UPDATEs.';
COMMENT ON COLUMN events.finished_at IS 'When the event reached succeeded or dead.';
COMMENT ON COLUMN event_attempts.outcome IS
    'succeeded, retried (another attempt follows) or dead (gave up); NULL while the attempt runs.';
