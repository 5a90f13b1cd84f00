-- Reverts 000003_dlq_undeliverable.up.sql (the copies kept there are lost).
DROP TABLE IF EXISTS dlq_undeliverable;
