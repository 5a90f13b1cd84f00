-- Reverts 000007_attempt_held_by.up.sql: attempts no longer say why they waited.
ALTER TABLE event_attempts DROP COLUMN IF EXISTS held_by;
