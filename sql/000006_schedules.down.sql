-- Reverts 000006_schedules.up.sql. The schedule definitions are lost; the events their
-- occurrences became stay (they are ordinary events).
DROP TABLE IF EXISTS schedules;
