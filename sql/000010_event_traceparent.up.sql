-- eventsched schema, version 10: the trace an event belongs to.
--
-- A producer that traces (OpenTelemetry: the client, the API, the demo producer, the
-- schedule leader) sends a W3C `traceparent` Kafka header with the event; the consumer keeps
-- it here (and in the event's job) so that every attempt, even a retry hours later or one
-- the reconciler re-enqueues, is a span of that trace, and the API shows the trace id
-- (docs/observability.md). NULL: the event came without a (valid) traceparent.
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY. A nullable column
-- without a default only touches the catalog.

ALTER TABLE events
    ADD COLUMN traceparent text
        CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');

COMMENT ON COLUMN events.traceparent IS
    'W3C traceparent (version 00) the event was published under; its attempts are spans of that trace. NULL: none.';
