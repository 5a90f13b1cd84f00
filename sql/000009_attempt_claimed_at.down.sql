-- Reverts 000009_attempt_claimed_at.up.sql: attempts keep only started_at (for rows written
-- since, the handler's start; the claim time of an attempt still running).
ALTER TABLE event_attempts DROP COLUMN IF EXISTS claimed_at;

COMMENT ON COLUMN event_attempts.started_at IS NULL;
COMMENT ON COLUMN event_attempts.lateness_ms IS
    'started_at - scheduled_for in milliseconds; negative if a worker clock runs ahead.';
