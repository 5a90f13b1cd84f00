-- Reverts 000004_attempt_budget.up.sql. Events re-run by a replay then count their
-- earlier attempts against max_retries again.
ALTER TABLE events DROP COLUMN IF EXISTS attempt_base;
COMMENT ON COLUMN events.status IS
    'scheduled -> running -> succeeded; running -> retrying -> running; running -> dead. Changed only by compare-and-set UPDATEs.';
