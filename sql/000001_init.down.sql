-- Reverts 000001_init.up.sql. Indexes, constraints and comments go with their
-- tables; event_attempts first because it references events.
DROP TABLE IF EXISTS event_attempts;
DROP TABLE IF EXISTS events;
